"""The model against transformers: same logits, same greedy tokens, whatever the chunking,
packing, dtype or checkpoint layout. Attention here is a plain reference implementation,
so a failure points at the model, not at the paged cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from golden import hf_greedy, hf_model, random_prompt
from splitserve.model.config import ModelLoadError
from splitserve.model.loader import load_model
from splitserve.model.tiny import VOCAB, make_tiny_llama

NEW_TOKENS = 64


def _attend(q, k, v, mask):
    """q [T, Hq, D], k/v [S, Hkv, D], mask [T, S] (True = may attend) -> [T, Hq, D]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                       attn_mask=mask)
    return o.transpose(0, 1)


class SingleSequenceAttention:
    """One sequence fed in consecutive chunks; every layer's K/V kept contiguous."""

    def __init__(self, num_layers: int):
        self.k: list = [None] * num_layers
        self.v: list = [None] * num_layers

    def __call__(self, layer, q, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k]), torch.cat([self.v[layer], v])
        self.k[layer], self.v[layer] = k, v
        t, s = q.shape[0], k.shape[0]
        # The chunk's queries are the last t positions: query i sees keys 0 .. s - t + i.
        return _attend(q, k, v, torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t))


class PackedPrefillAttention:
    """Several fresh sequences back to back in one forward: block-diagonal causal mask."""

    def __init__(self, lengths):
        seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        self.mask = torch.ones(len(seq), len(seq), dtype=torch.bool).tril() & (seq[:, None] == seq[None, :])

    def __call__(self, layer, q, k, v):
        return _attend(q, k, v, self.mask)


@torch.inference_mode()
def prefill_logits(model, ids, chunks=1, start=0):
    attn = SingleSequenceAttention(model.config.num_layers)
    ids = torch.tensor(ids)
    pos = torch.arange(start, start + len(ids))
    hidden = [model(i, p, attn) for i, p in zip(ids.chunk(chunks), pos.chunk(chunks))]
    return model.compute_logits(torch.cat(hidden))


@torch.inference_mode()
def greedy(model, prompt, n):
    attn = SingleSequenceAttention(model.config.num_layers)
    hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), attn)
    out = []
    for _ in range(n):
        out.append(int(model.compute_logits(hidden[-1:]).argmax(-1)))
        hidden = model(torch.tensor(out[-1:]), torch.tensor([len(prompt) + len(out) - 1]), attn)
    return out


@torch.inference_mode()
def hf_logits(model_dir, ids, start=0):
    pos = torch.arange(start, start + len(ids))[None]
    return hf_model(str(model_dir))(torch.tensor([ids]), position_ids=pos).logits[0].float()


@pytest.fixture(scope="module")
def tiny_llama_tied_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tied"), tie=True, seed=1)


@pytest.fixture(scope="module")
def tiny_mistral_dir(tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(2)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # wide random weights: well-separated greedy logits
                p.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("tiny-mistral")
    model.save_pretrained(path, safe_serialization=True)
    return path


MODELS = ["tiny_llama_dir", "tiny_llama_tied_dir", "tiny_qwen2_dir", "tiny_mistral_dir"]


@pytest.mark.parametrize("which", MODELS)
def test_prompt_logits_match_transformers(which, request):
    model_dir = request.getfixturevalue(which)
    model = load_model(model_dir)
    prompt = random_prompt(45, seed=3)
    got = prefill_logits(model, prompt)
    assert got.dtype == torch.float32 and got.shape == (45, model.config.vocab_size)
    torch.testing.assert_close(got, hf_logits(model_dir, prompt), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", MODELS)
def test_greedy_decode_matches_transformers_generate(which, request):
    model_dir = request.getfixturevalue(which)
    prompt = random_prompt(21, seed=4)
    assert greedy(load_model(model_dir), prompt, NEW_TOKENS) == hf_greedy(model_dir, prompt, NEW_TOKENS)


def test_chunked_prefill_equals_one_chunk(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    prompt = random_prompt(50, seed=5)
    torch.testing.assert_close(prefill_logits(model, prompt, chunks=2), prefill_logits(model, prompt),
                               atol=1e-5, rtol=1e-5)


def test_packed_sequences_equal_each_alone(tiny_qwen2_dir):
    """The flattened batch: each sequence's positions restart at 0 and nothing leaks."""
    model = load_model(tiny_qwen2_dir)
    a, b = random_prompt(9, seed=6), random_prompt(14, seed=7)
    with torch.inference_mode():
        hidden = model(torch.tensor(a + b), torch.cat([torch.arange(9), torch.arange(14)]),
                       PackedPrefillAttention([9, 14]))
        packed = model.compute_logits(hidden)
    # A leak between sequences moves logits by O(1). Matmuls over 23 rows round differently
    # from matmuls over 9 and 14: with 1e-5, 5 of 20 prompt pairs failed on the eager model
    # (unfused ops) too, so the bound is the golden tests' 1e-4.
    torch.testing.assert_close(packed, torch.cat([prefill_logits(model, a), prefill_logits(model, b)]),
                               atol=1e-4, rtol=1e-4)


def test_llama3_rope_at_long_context_positions(tiny_llama_dir):
    """Positions near Llama 3.1's 131,072 limit, where the scaled frequencies matter most."""
    model = load_model(tiny_llama_dir)
    prompt = random_prompt(16, seed=8)
    torch.testing.assert_close(prefill_logits(model, prompt, start=131_000),
                               hf_logits(tiny_llama_dir, prompt, start=131_000), atol=1e-4, rtol=1e-4)


def test_bf16_checkpoint_loads_as_bf16(tmp_path):
    model_dir = make_tiny_llama(tmp_path, dtype=torch.bfloat16)
    model = load_model(model_dir)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    prompt = random_prompt(30, seed=9)
    logits = prefill_logits(model, prompt)
    assert logits.dtype == torch.float32
    # bf16 rounding differs between any two implementations; a loose bound still catches
    # wrong weights or rope (those move logits by whole units).
    torch.testing.assert_close(logits, hf_logits(model_dir, prompt), atol=0.3, rtol=0.05)
    assert {p.dtype for p in load_model(model_dir, dtype="float32").parameters()} == {torch.float32}


def test_sharded_checkpoint_with_and_without_index(tiny_llama_dir, tmp_path):
    hf_model(str(tiny_llama_dir)).save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    prompt = random_prompt(12, seed=10)
    want = prefill_logits(load_model(tiny_llama_dir), prompt)
    torch.testing.assert_close(prefill_logits(load_model(tmp_path), prompt), want)
    (tmp_path / "model.safetensors.index.json").unlink()
    torch.testing.assert_close(prefill_logits(load_model(tmp_path), prompt), want)


def _copy(src, dst, weights=True):
    dst.mkdir()
    for f in src.iterdir():
        if weights or f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    return dst


def _edit_config(model_dir, **changes):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(changes)
    (model_dir / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture_is_named(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    _edit_config(d, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(d)


def test_missing_safetensors_is_a_clear_error(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m", weights=False)
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights in .*m"):
        load_model(d)


def test_missing_and_misshaped_tensors_are_named(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    weights = load_file(d / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, d / "model.safetensors")
    with pytest.raises(ModelLoadError, match="missing tensor.*model.layers.1.mlp.up_proj.weight"):
        load_model(d)
    _edit_config(d, intermediate_size=96)
    with pytest.raises(ModelLoadError, match=r"'model.layers.0.mlp.down_proj.weight' in .*model.safetensors "
                                             r"has shape \[64, 128\], the config implies \[64, 96\]"):
        load_model(d)


def test_bad_dtype_argument(tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="dtype must be 'auto' or one of"):
        load_model(tiny_llama_dir, dtype="float64")
