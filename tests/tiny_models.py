from splitserve.model.tiny import VOCAB, make_tiny_llama, make_tiny_qwen2  # noqa: F401
