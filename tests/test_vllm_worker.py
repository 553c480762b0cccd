"""`--engine vllm`, without starting vLLM: its KV events re-hashed into the hashes the kv
router computes, our sampling controls as vLLM's and its outputs as ours, the engine
arguments and core binding a worker passes, and the flags refused before anything loads.
(The served behaviour is in test_vllm_worker_e2e.py and test_vllm_worker_router.py.)"""

from __future__ import annotations

import pytest
from vllm.distributed.kv_events import AllBlocksCleared
from vllm.distributed.kv_events import BlockRemoved as VBlockRemoved
from vllm.distributed.kv_events import BlockStored as VBlockStored
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput
from vllm.outputs import RequestOutput as VRequestOutput
from vllm.sampling_params import RequestOutputKind

from splitserve.cli.main import main
from splitserve.config import ConfigError, EngineConfig
from splitserve.engine.errors import RequestError
from splitserve.engine.types import FinishReason, SamplingParams, TokenLogprobs
from splitserve.kvtypes.block_hash import extend_block_hashes
from splitserve.kvtypes.events import AllCleared, BlockRemoved, BlockStored
from splitserve.structured_output import StructuredOutput
from splitserve.worker.vllm_kv_translate import VllmKVTranslator
from splitserve.worker.vllm_options import VllmOptions, cpu_thread_env, engine_kwargs, parse_vllm_arg
from splitserve.worker.vllm_sampling import from_vllm, to_vllm

BS = 4


def _stored(hashes, parent, tokens, medium="GPU"):
    return VBlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                        block_size=BS, lora_id=None, medium=medium, lora_name=None)


# --- KV events ---------------------------------------------------------------------------
def test_stored_blocks_get_the_hashes_the_router_computes_from_the_prompt():
    tr = VllmKVTranslator(BS)
    prompt = list(range(10, 22))                      # 3 full blocks
    ours = extend_block_hashes([], prompt, BS)
    # vLLM stores the first block with one event and the next two with another.
    assert tr.translate([_stored([b"a"], None, prompt[:4])]) == [BlockStored(ours[:1], None)]
    assert tr.translate([_stored([b"b", b"c"], b"a", prompt[4:])]) == \
        [BlockStored(ours[1:], ours[0])]
    assert tr.snapshot() == [AllCleared(), BlockStored(ours)]


def test_reannounced_blocks_are_not_stored_twice_and_new_ones_after_them_are():
    tr = VllmKVTranslator(BS)
    prompt = list(range(8))
    ours = extend_block_hashes([], prompt + [1, 2, 3, 4], BS)
    tr.translate([_stored([b"a", b"b"], None, prompt)])
    # A prefix-cache hit re-announces a and b; the request then stores c after them.
    assert tr.translate([_stored([b"a", b"b"], None, prompt)]) == []
    assert tr.translate([_stored([b"c"], b"b", [1, 2, 3, 4])]) == [BlockStored([ours[2]], ours[1])]


def test_a_hash_named_by_two_vllm_blocks_is_removed_with_the_last_of_them():
    tr = VllmKVTranslator(BS)
    tokens = [5, 6, 7, 8]
    (ours,) = extend_block_hashes([], tokens, BS)
    # The same tokens under two cache salts: two vLLM hashes, one of ours.
    assert tr.translate([_stored([b"salt1"], None, tokens)]) == [BlockStored([ours])]
    assert tr.translate([_stored([b"salt2"], None, tokens)]) == []
    assert tr.translate([VBlockRemoved(block_hashes=[b"salt1"], medium="GPU")]) == []
    assert tr.translate([VBlockRemoved(block_hashes=[b"salt2", b"unknown"], medium="GPU")]) == \
        [BlockRemoved([ours])]
    assert tr.snapshot() == [AllCleared()]


def test_unknown_parents_other_media_and_clears():
    tr = VllmKVTranslator(BS)
    # A child whose parent was never seen cannot be chained: nothing is announced.
    assert tr.translate([_stored([b"x"], b"never-seen", [1, 2, 3, 4])]) == []
    # Blocks offloaded to a CPU tier are not the pool the router reasons about.
    assert tr.translate([_stored([b"y"], None, [1, 2, 3, 4], medium="CPU")]) == []
    tr.translate([_stored([b"z"], None, [1, 2, 3, 4])])
    assert tr.translate([AllBlocksCleared()]) == [AllCleared()]
    assert tr.snapshot() == [AllCleared()]
    # A block size other than the worker's is refused rather than mis-hashed.
    wrong = VBlockStored(block_hashes=[b"w"], parent_block_hash=None, token_ids=[1] * 8,
                         block_size=8, lora_id=None, medium="GPU", lora_name=None)
    assert tr.translate([wrong]) == []


# --- sampling ----------------------------------------------------------------------------
def test_sampling_controls_map_field_for_field():
    params = SamplingParams(max_tokens=7, temperature=0.7, top_p=0.5, top_k=0, seed=3,
                            stop_token_ids=(9,), ignore_eos=True, logprobs=2,
                            presence_penalty=0.5, frequency_penalty=-0.5,
                            repetition_penalty=1.2, logit_bias=((5, 10.0),), min_tokens=2)
    v = to_vllm("r", params)
    assert (v.max_tokens, v.temperature, v.top_p, v.top_k, v.seed) == (7, 0.7, 0.5, 0, 3)
    assert (v.stop_token_ids, v.ignore_eos, v.logprobs, v.min_tokens) == ([9], True, 2, 2)
    assert (v.presence_penalty, v.frequency_penalty, v.repetition_penalty) == (0.5, -0.5, 1.2)
    assert v.logit_bias == {5: 10.0}
    assert v.output_kind is RequestOutputKind.DELTA and not v.detokenize
    assert to_vllm("r", SamplingParams(temperature=1e-6)).temperature == 0.0   # ours: greedy


def test_structured_output_maps_onto_vllms():
    schema = to_vllm("r", SamplingParams(structured=StructuredOutput.json_schema({"type": "object"})))
    assert schema.structured_outputs.json == '{"type":"object"}'
    choice = to_vllm("r", SamplingParams(structured=StructuredOutput.choice(["yes", "no"])))
    assert choice.structured_outputs.choice == ["yes", "no"]


def test_a_migrated_structured_request_is_refused_not_restarted():
    resumed = SamplingParams(structured=StructuredOutput.json_schema({"type": "object"}),
                             resumed_output_tokens=5)
    with pytest.raises(RequestError, match="cannot continue on a vLLM worker") as e:
        to_vllm("r", resumed)
    assert e.value.param == "response_format"


def test_an_unmapped_sampling_field_is_refused_not_dropped(monkeypatch):
    import splitserve.worker.vllm_sampling as vs
    monkeypatch.setattr(vs, "_MAPPED", vs._MAPPED - {"min_tokens"})
    with pytest.raises(RequestError, match="min_tokens is not supported by vLLM workers"):
        to_vllm("r", SamplingParams(max_tokens=4, min_tokens=1))


def test_outputs_become_ours_with_logprobs_most_likely_first():
    # The sampled token (7) ranks 3rd, outside the 2 most likely asked for.
    lps = [{7: Logprob(-2.0, rank=3), 1: Logprob(-0.5, rank=1), 2: Logprob(-1.0, rank=2)}]
    out = VRequestOutput("r", None, [1, 2], None, [CompletionOutput(
        0, "", [7], None, lps, finish_reason="length")], finished=True, num_cached_tokens=4)
    mine = from_vllm("r", out, num_prompt_tokens=2, num_logprobs=2)
    assert (mine.new_token_ids, mine.finished, mine.finish_reason) == ([7], True, FinishReason.LENGTH)
    assert (mine.num_prompt_tokens, mine.num_cached_tokens) == (2, 4)
    assert mine.logprobs == [TokenLogprobs(7, -2.0, ((1, -0.5), (2, -1.0)))]


# --- engine arguments and cores ----------------------------------------------------------
def test_engine_arguments_follow_our_config():
    kw = engine_kwargs(EngineConfig(dtype="float32", max_model_len=512, kv_cache_memory=2**28),
                       VllmOptions(tensor_parallel_size=2, enforce_eager=True,
                                   extra_args=(("max_num_partial_prefills", 2),)), "/m")
    assert kw["model"] == "/m" and kw["dtype"] == "float32" and kw["max_model_len"] == 512
    assert kw["kv_cache_memory_bytes"] == 2**28 and kw["tensor_parallel_size"] == 2
    assert kw["enforce_eager"] and kw["max_num_partial_prefills"] == 2
    # Our engine's default block size is left to vLLM (CPU needs multiples of 32)...
    assert "block_size" not in kw
    # ...a chosen one is passed.
    assert engine_kwargs(EngineConfig(block_size=32), VllmOptions(), "/m")["block_size"] == 32
    # Flags of our engine alone are refused, not dropped.
    with pytest.raises(ConfigError, match="--cpu-linear"):
        engine_kwargs(EngineConfig(cpu_linear="torch"), VllmOptions(), "/m")


def test_vllm_args_parse_as_json_and_cannot_override_the_workers_own():
    assert parse_vllm_arg("max-num-partial-prefills=2") == ("max_num_partial_prefills", 2)
    assert parse_vllm_arg("tokenizer_mode=slow") == ("tokenizer_mode", "slow")
    with pytest.raises(ConfigError, match="use --max-model-len"):
        VllmOptions(extra_args=(("max_model_len", 5),))
    with pytest.raises(ConfigError, match="the worker sets it itself"):
        VllmOptions(extra_args=(("kv_events_config", {}),))


def test_cpu_cores_bound_as_the_worker_was_given_them():
    import os
    cores = sorted(os.sched_getaffinity(0))
    assert cpu_thread_env(None, 1, {"VLLM_CPU_OMP_THREADS_BIND": "0"}) == {}
    assert cpu_thread_env(None, 1, {}) == {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores))}
    if len(cores) > 1:
        # A share of the machine (serve split the cores): no binding, that many threads.
        assert cpu_thread_env(1, 1, {}) == {"VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                            "OMP_NUM_THREADS": "1"}


# --- flags refused before anything loads -------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["worker", "--engine", "vllm", "--role", "decode"], "needs --discovery"),
    (["worker", "--engine", "vllm", "--role", "prefill", "--vllm-arg",
      'kv_transfer_config={"kv_role": "kv_both"}'], "configures its KV connector"),
    (["worker", "--enforce-eager"], "add --engine vllm"),
    (["worker", "--engine", "vllm", "--device", "cuda:1"], "CUDA_VISIBLE_DEVICES"),
    (["worker", "--engine", "vllm", "--vllm-arg", "model=x"], "use --model"),
    (["worker", "--engine", "vllm", "--vllm-arg", "no_such_arg=1"], "not one of vLLM's engine"),
    (["worker", "--engine", "vllm", "--tensor-parallel-size", "0"], "at least 1"),
])
def test_bad_vllm_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_models_are_named_as_our_engine_names_them_and_hub_ids_as_vllm_does(tmp_path):
    from splitserve.model.registry import DEFAULT_MODEL_NAME
    from splitserve.worker.vllm_model import model_argument, model_name
    assert model_name(None, "/cache/converted-dir") == DEFAULT_MODEL_NAME
    assert model_argument(str(tmp_path)) == str(tmp_path)
    assert model_name(str(tmp_path), str(tmp_path)) == tmp_path.name
    # Neither a directory nor a .gguf: vLLM's to resolve (and download), named as given.
    assert model_argument("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert model_name("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct") == \
        "meta-llama/Llama-3.1-8B-Instruct"


def test_vllms_cpu_build_gets_a_kv_cache_it_can_start_with_and_block_sizes_it_can_use():
    from splitserve.worker.vllm_options import CPU_DEFAULT_KV_CACHE_BYTES, fit_platform
    with pytest.raises(ConfigError, match="multiple of 32, got 16"):
        fit_platform({"block_size": 16}, is_cpu=True)
    assert fit_platform({"block_size": 16}, is_cpu=False) == {"block_size": 16}   # CUDA
    # Without --kv-cache-memory: our engine's cap, not vLLM's 92% of the machine.
    assert fit_platform({}, True, {}) == {"kv_cache_memory_bytes": CPU_DEFAULT_KV_CACHE_BYTES}
    assert fit_platform({}, True, {"VLLM_CPU_KVCACHE_SPACE": "4"}) == {}
    assert fit_platform({"kv_cache_memory_bytes": 5}, True, {}) == {"kv_cache_memory_bytes": 5}
