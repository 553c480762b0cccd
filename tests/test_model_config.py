"""config.json in every spelling transformers has used maps to one ModelArchConfig, and
what the model does not implement is refused by name instead of served wrong."""

from __future__ import annotations

import json

import pytest

from splitserve.model.config import ModelArchConfig, ModelLoadError

LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
NORMALIZED = {"rope_type": "llama3", **LLAMA3}


def base(**changes):
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8,
           "num_key_value_heads": 2, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5}
    cfg.update(changes)
    return cfg


def parse(tmp_path, cfg, gen=None):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if gen is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    return ModelArchConfig.from_dir(tmp_path)


@pytest.mark.parametrize("spelling", [
    {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", **LLAMA3}},   # transformers v5
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}},      # v4.4x
    {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3}},           # early Llama 3.1
])
def test_llama3_rope_spellings_normalize_alike(tmp_path, spelling):
    c = parse(tmp_path, base(**spelling))
    assert (c.rope_theta, c.rope_scaling) == (500000.0, NORMALIZED)


def test_defaults_and_derived_fields(tmp_path):
    c = parse(tmp_path, base(num_key_value_heads=None))
    assert c.head_dim == 32 and c.num_kv_heads == 8
    assert (c.rope_theta, c.rope_scaling) == (10000.0, None)
    assert c.torch_dtype == "float32" and not c.tie_word_embeddings and not c.attention_bias
    assert c.eos_token_ids == () and c.bos_token_id is None


def test_default_rope_type_in_rope_parameters_is_none(tmp_path):
    c = parse(tmp_path, base(rope_parameters={"rope_theta": 1e6, "rope_type": "default"}))
    assert (c.rope_theta, c.rope_scaling) == (1e6, None)


def test_eos_is_the_union_of_config_and_generation_config(tmp_path):
    c = parse(tmp_path, base(eos_token_id=128001, bos_token_id=128000, torch_dtype="bfloat16"),
              gen={"eos_token_id": [128001, 128008, 128009]})
    assert c.eos_token_ids == (128001, 128008, 128009) and c.bos_token_id == 128000
    assert c.torch_dtype == "bfloat16"


def test_qwen2_has_qkv_bias(tmp_path):
    c = parse(tmp_path, base(architectures=["Qwen2ForCausalLM"], use_sliding_window=False,
                             sliding_window=32768, dtype="bfloat16"))
    assert c.attention_bias and c.torch_dtype == "bfloat16"


def test_fingerprint(tmp_path):
    assert parse(tmp_path, base()).fingerprint() == {
        "architecture": "LlamaForCausalLM", "num_layers": 2, "num_heads": 8, "num_kv_heads": 2,
        "head_dim": 32, "vocab_size": 1000, "hidden_size": 256}


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 rope scaling is missing"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per-layer-type rope"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias=true on LlamaForCausalLM"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "sliding-window attention"),
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ({"torch_dtype": "float64"}, "torch_dtype 'float64'"),
    ({"vocab_size": None}, "required field 'vocab_size' is missing"),
])
def test_unsupported_configs_are_refused_by_name(tmp_path, changes, message):
    with pytest.raises(ModelLoadError, match=message) as e:
        parse(tmp_path, base(**changes))
    assert "config.json" in str(e.value)


def test_missing_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json not found"):
        ModelArchConfig.from_dir(tmp_path)
