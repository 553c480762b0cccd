"""Tiny random Hugging Face checkpoints, built with transformers and saved to disk: the
models of the test suite and of the benchmarks that need no real weights.

The tokenizer is a byte-level BPE with no merges: every byte is a token, so any text
round-trips and prompts of exact token counts are trivial to build.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320  # 256 bytes + specials + spare ids the random model may emit


def _write_byte_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Token id = byte value. (ByteLevel.alphabet() is a set: its order, and so every id,
    # changed with each process's string hashing, and with them every tiny model's output.)
    vocab = {ch: b for b, ch in enumerate(_byte_level_chars())}
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|begin|>", "<|end|>", "<|user|>", "<|assistant|>"]
    for s in specials:
        vocab[s] = len(vocab)
    for i in range(len(vocab), VOCAB):
        vocab[f"<|extra_{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>",
        additional_special_tokens=specials[2:])
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fast.save_pretrained(path)


def _byte_level_chars() -> list[str]:
    """The printable character byte-level BPE writes for each byte value 0..255: bytes
    that are printable Latin-1 stand for themselves, the others take 256, 257, … in
    byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _finish(model, path: Path, dtype: torch.dtype) -> Path:
    model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    _write_byte_tokenizer(path)
    return path


def make_tiny_llama(path: Path, *, dtype: torch.dtype = torch.float32, tie: bool = False,
                    max_position_embeddings: int = 4096, seed: int = 0, **overrides) -> Path:
    """GQA Llama with llama3 rope scaling (as in Llama 3.1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=tie, bos_token_id=256, eos_token_id=257,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0,
                      "original_max_position_embeddings": max(max_position_embeddings // 8, 64)},
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    _scale_init(model)
    return _finish(model, Path(path), dtype)


def make_tiny_qwen2(path: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                    **overrides) -> Path:
    """Qwen2 with q/k/v bias and tied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        bos_token_id=256, eos_token_id=257,
    )
    cfg.update(overrides)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    _scale_init(model)
    return _finish(model, Path(path), dtype)


def _scale_init(model) -> None:
    """Wider-than-default random weights so greedy logits are well separated (no near-ties
    that float rounding could flip) and generations do not collapse into one repeated id."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 if "embed" in name else 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
