"""The failure table's rows that end a request, with vLLM workers under `serve --engine
vllm --kv-fallback fail` (vLLM's kv_load_failure_policy fail): a prefill worker whose KV
does not match the decode worker's (another block size) is refused naming both sides; a
prefill worker refusing the prompt is a 502 at once, not after its lease;
the prefill worker killed mid-transfer is a clear 502 from the frontend, the same answer
our engine's workers give; the decode worker killed mid-transfer makes the prefill worker
drop the prefill at once. Every KV block is free again afterwards.

(The same kill under --kv-fallback local, recomputed and counted: test_vllm_disagg.py.)"""

from __future__ import annotations

import re
import threading

import httpx
import openai
import pytest

from live_server import pid_alive
from procs import metric_value
from vllm_pd import (MODEL, SERVE_ARGS, STORY, descendants, generate, kill_prefill_mid_transfer,
                     kill_tree, prefill_target, vllm_pd_server, wait_all_free,
                     wait_first_blocks_sent, wait_for, wait_restarted, worker_pid)
from workers import listed, start_worker

# Slow (a vLLM 1P+1D serve plus restarts: minutes on 2 cores): run by `make test-slow`, which CI runs too.
pytestmark = pytest.mark.slow

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def discovery_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("discovery")


@pytest.fixture(scope="module")
def discovery(discovery_dir):
    return f"file:{discovery_dir}"


@pytest.fixture(scope="module")
def server(tmp_path_factory, discovery):
    with vllm_pd_server(tmp_path_factory.mktemp("serve-vllm-pd-fail"), "--kv-fallback", "fail",
                        "--kv-lease", "10", "--discovery", discovery) as srv:
        yield srv


def _decode_metric(server, name: str, **labels) -> float:
    return metric_value(f"{server.worker_url}/metrics", name, **labels)


def test_a_prefill_worker_with_another_block_size_is_refused_naming_both(
        server, discovery, discovery_dir, smollm2_dir, tmp_path):
    # The engine flags of serve's workers, but blocks of 64 tokens (serve's are 32), and
    # steps of as many (vLLM's minimum).
    flags = [a for a in SERVE_ARGS if a != "--served-model-name" and a != MODEL]
    for flag in ("--block-size", "--max-num-batched-tokens"):
        flags[flags.index(flag) + 1] = "64"
    odd = start_worker("prefill", smollm2_dir, tmp_path, *flags, "--discovery", discovery,
                       "--kv-lease", "10", "--worker-id", "odd-prefill", name="odd-prefill",
                       timeout=900)
    odd_processes = descendants(odd.process.pid)
    try:
        # Its port file comes first; its record with the KV address just after.
        wait_for(lambda: listed(discovery_dir, "odd-prefill"), "odd-prefill in discovery")
        fallbacks0 = _decode_metric(server, "splitserve_kv_transfer_fallbacks_total")
        target = {"worker_id": "odd-prefill", "kv_host": odd.info.kv_host,
                  "kv_port": odd.info.kv_port}
        status, tokens, body = generate(server.worker_url, "mismatch", [100 + i for i in range(80)],
                                        target, max_tokens=4, temperature=0)
        assert status == 502 and body["code"] == "kv_transfer", body
        wait_for(lambda: _decode_metric(server, "splitserve_kv_transfer_fallbacks_total",
                                        reason="mismatch") >= 1, "the mismatch to be counted")
        assert _decode_metric(server, "splitserve_kv_transfer_fallbacks_total") == fallbacks0 + 1
        # The decode side's vLLM says why, with both fingerprints' block sizes.
        (line,) = [ln for ln in server.log().splitlines()
                   if re.search(r"request_id=mismatch\S* transfer \S+: KV load failed \(mismatch\)", ln)]
        assert "decode has" in line and "prefill has" in line and "64" in line and "32" in line
        # doctor's session probe names the same, from the decode worker's vLLM rank.
        probe = httpx.post(f"{server.worker_url}/doctor/kv_session", json=target,
                           timeout=60).json()
        assert probe["outcome"] == "mismatch" and "kv_block_size" in probe["reason"], probe
        wait_all_free(server.worker_url, odd.url)      # odd's lease (10 s) frees its blocks
    finally:
        odd.stop()
        wait_for(lambda: not [p for p in odd_processes if pid_alive(p)],
                 "the odd prefill worker's vLLM processes to exit", timeout=60)


def test_a_prefill_worker_refusing_the_prompt_is_a_502_at_once(server, discovery, discovery_dir,
                                                               smollm2_dir, tmp_path):
    """Its /prefill answers 400 (the prompt is longer than its --max-model-len): the decode
    worker stops waiting for KV that will never come, long before the prefill worker's
    lease (10 s) would say so; a fallback `refused`, counted and in /incidents."""
    flags = [a for a in SERVE_ARGS if a != "--served-model-name" and a != MODEL]
    flags[flags.index("--max-model-len") + 1] = "256"
    short = start_worker("prefill", smollm2_dir, tmp_path, *flags, "--discovery", discovery,
                         "--kv-lease", "10", "--worker-id", "short-prefill",
                         name="short-prefill", timeout=900)
    short_processes = descendants(short.process.pid)
    try:
        wait_for(lambda: listed(discovery_dir, "short-prefill"), "short-prefill in discovery")
        target = {"worker_id": "short-prefill", "kv_host": short.info.kv_host,
                  "kv_port": short.info.kv_port}
        status, _, body = generate(server.worker_url, "too-long", [100 + i for i in range(600)],
                                   target, max_tokens=4, temperature=0)
        assert status == 502 and body["code"] == "kv_transfer", body
        assert "refused the prefill: it answered 400" in body["message"], body
        assert _decode_metric(server, "splitserve_kv_transfer_fallbacks_total",
                              reason="refused") == 1
        incidents = httpx.get(f"{server.worker_url}/incidents", timeout=10).json()["recent"]
        assert [(i["reason"], i["peer"]) for i in incidents
                if i["request_id"] == "too-long"] == [("refused", "short-prefill")]
        wait_all_free(server.worker_url, short.url)
    finally:
        short.stop()
        wait_for(lambda: not [p for p in short_processes if pid_alive(p)],
                 "the short prefill worker's vLLM processes to exit", timeout=60)


def test_decode_killed_mid_transfer_the_prefill_worker_drops_the_prefill(server):
    """The decode worker's POST /prefill ends with it: the prefill worker aborts the
    prefill and frees its blocks at once, without waiting for its lease."""
    (p_url,) = server.workers["prefill"]
    old_decode = server.worker_url
    expired0 = metric_value(f"{p_url}/metrics", "splitserve_kv_lease_expired_total")
    sent0 = metric_value(f"{p_url}/metrics", "splitserve_kv_transfer_bytes_total", direction="sent")
    prompt = [(i * 37) % 5000 + 100 for i in range(1600)]

    def ask():
        try:
            generate(old_decode, "kill-d", prompt, prefill_target(server), max_tokens=8,
                     temperature=0)
        except httpx.HTTPError:
            pass            # its decode worker died under it

    request = threading.Thread(target=ask)
    request.start()
    wait_first_blocks_sent(p_url, sent0)
    kill_tree(worker_pid(server, "decode"))
    request.join(60)
    wait_for(lambda: re.search(r"request_id=kill-d\.\S+ the decode worker left; prefill "
                               r"aborted", server.log()), "the prefill worker to drop the prefill")
    wait_all_free(p_url)
    assert re.search(r"request kill-d\.\S+: released \d+ KV blocks \(the prefill request "
                     r"ended as FINISHED_ABORTED\)", server.log())
    assert metric_value(f"{p_url}/metrics", "splitserve_kv_lease_expired_total") == expired0
    # serve restarts the decode worker (new port): the next test goes through it.
    wait_restarted(server, "decode", old_decode)


def test_prefill_killed_mid_transfer_is_a_502_from_the_frontend(server):
    """Last in the module: it kills the prefill worker (serve restarts it)."""
    def ask(rid: str):
        with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                           timeout=600) as client:
            try:
                return client.completions.create(
                    model=MODEL, prompt=f"A very long night, {rid}. " + STORY * 40, max_tokens=8,
                    temperature=0, extra_headers={"x-request-id": rid})
            except openai.APIStatusError as e:
                return e

    _, error = kill_prefill_mid_transfer(server, ask)
    assert isinstance(error, openai.APIStatusError), error
    assert error.status_code == 502 and "could not be transferred" in str(error.message)
    assert "fallback policy is 'fail'" in str(error.message)
    wait_all_free(server.worker_url)
