"""The embedded default model is a real instruct model: asked a factual question greedily,
it answers correctly, token for token as transformers does — in the engine and through
the OpenAI API of a live `splitserve serve` with no --model."""

import openai
import torch

from live_server import start_serve
from splitserve.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.types import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_engine_answers_paris_like_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    eng = LLMEngine(EngineConfig())
    ours = eng.generate([prompt], SamplingParams(max_tokens=24, temperature=0))[0]
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    assert ours == ref
    assert "Paris" in tok.decode(ours)
    assert eng.stats().kv_blocks_in_use == 0


def test_serve_without_model_answers_paris(smollm2_dir, tmp_path):
    srv = start_serve(None, tmp_path)
    try:
        with openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0) as client:
            models = client.models.list().data
            assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
            reply = client.chat.completions.create(model=models[0].id, messages=QUESTION,
                                                   temperature=0, max_tokens=24)
        assert "Paris" in reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
        assert srv.wait_worker_metric("splitserve_kv_blocks_in_use", 0) == 0
    finally:
        assert srv.stop() == 0
