"""Two plain `vllm serve` processes configured only with SplitserveConnector disaggregate
correctly: the answer through `splitserve vllm-proxy` equals vLLM's own aggregated answer
token for token, the KV is counted as transferred, nothing falls back, every block is free
afterwards; and the hand-off survives what the wire does to it.

One prefill and one decode server for the whole module (each takes about a minute to
start on a loaded 2-core machine), one core each. The aggregated reference is the prefill
server itself asked without kv_transfer_params: plain vLLM, the connector stays idle.

Both servers move their KV through the host mirror (`host_staging`), the path KV in GPU
memory takes (staging.py): every block is copied out of vLLM's KV after its step on P and
into it before D's next step. The direct path (CPU KV read in place) is the one
`serve --engine vllm` takes: tests/test_vllm_disagg*.py, test_vllm_connector_long.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from fault_proxy import FaultProxy
from live_server import free_port
from procs import metric_value, spawn
from splitserve.bench.vllm_launch import connector_config
from splitserve.model.registry import resolve_model

# Slow (two plain vllm serve and their restarts: minutes on 2 cores): run by `make test-slow`, which CI runs too.
pytestmark = pytest.mark.slow

pytest.importorskip("vllm")

BLOCK = 32            # vLLM CPU's attention needs a multiple of 32
LEASE = 6.0
STORY = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, counting "
         "the steps as his father had taught him, and when he reached the lamp room he "
         "wiped the great lens clean of salt before lighting the wick. ")
PROMPTS = ["Hello, my name is",
           "Write one sentence about the sea. " + STORY,
           STORY * 14 + "What did the keeper do at dusk?"]       # ~600 tokens: many blocks


def _vllm_serve(name: str, core: str, role: str, extra: dict, tmp: Path,
                args: list[str]) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    config = connector_config(role, extra)
    cmd = [str(Path(sys.executable).parent / "vllm"), "serve", str(resolve_model(None)),
           "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
           "--block-size", str(BLOCK), "--max-model-len", "2048", "--enforce-eager",
           "--served-model-name", "smol", "--kv-transfer-config", json.dumps(config), *args]
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=core, VLLM_CPU_KVCACHE_SPACE="1")
    log = tmp / f"{name}.log"
    with open(log, "wb") as f:
        # Its own process group: vLLM's engine and worker processes go with it.
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"vllm serve at {url} did not start:\n"
                               f"{log.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)


def _stop(proc: subprocess.Popen, group: bool = True) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(60)
            if group:   # the group outlives its leader while vLLM's children shut down
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-pair")
    kv_port = free_port()
    timing = {"lease": LEASE, "heartbeat_interval": 1.0, "stall_timeout": 6.0,
              "host_staging": True}
    # P chunks its prefill (32 tokens a step) so blocks stream while the prompt computes,
    # and computes every prompt afresh (no prefix cache): the aggregated reference never
    # reuses KV of a transfer, and each transfer's blocks really are computed step by step.
    # D takes tcp so the fault proxy below sits in the payload's path.
    p = _vllm_serve("prefill", "0", "kv_producer", {"kv_port": kv_port, **timing}, tmp,
                    ["--max-num-batched-tokens", str(BLOCK), "--no-enable-prefix-caching"])
    d = _vllm_serve("decode", "1", "kv_consumer", {"transport": "tcp", **timing}, tmp, [])
    procs = [p[0], d[0]]
    try:
        for proc, url, log in (p, d):
            _wait_healthy(proc, url, log)
        proxy_proc, proxy_port, _ = spawn(
            ["vllm-proxy", "--prefill", p[1], "--decode", d[1],
             "--prefill-kv", f"127.0.0.1:{kv_port}"], tmp, "proxy", timeout=60)
        procs.append(proxy_proc)
        yield {"p": p[1], "d": d[1], "p_log": p[2], "d_log": d[2], "kv_port": kv_port,
               "p_proc": p[0],
               "proxy": f"http://127.0.0.1:{proxy_port}"}
    finally:
        for i, proc in reversed(list(enumerate(procs))):
            _stop(proc, group=i < 2)


def _complete(url: str, prompt: str, params: dict | None = None, max_tokens: int = 24) -> dict:
    body = {"model": "smol", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "return_token_ids": True}
    if params is not None:
        body["kv_transfer_params"] = params
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _tokens(choice: dict) -> list[int]:
    return choice["token_ids"]


def _wait(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _all_blocks_free(pair) -> None:
    for url in (pair["p"], pair["d"]):
        _wait(lambda: metric_value(url + "/metrics", "vllm:kv_cache_usage_perc") == 0,
              f"{url} to free every KV block")


def _kv(pair, side: str, name: str, **labels) -> float:
    return metric_value(pair[side] + "/metrics", name, **labels)


def _pair_request(pair, prompt: str, kv_port: int) -> dict:
    """P and D asked at the same time (as the proxy does), D told to reach P at kv_port."""
    tid = f"t-{uuid.uuid4().hex[:12]}"
    with ThreadPoolExecutor(2) as ex:
        p = ex.submit(_complete, pair["p"], prompt,
                      {"do_remote_decode": True, "transfer_id": tid}, 1)
        d = ex.submit(_complete, pair["d"], prompt,
                      {"do_remote_prefill": True, "transfer_id": tid,
                       "remote_host": "127.0.0.1", "remote_port": kv_port})
        p.result()
        return d.result()


def test_two_plain_vllm_serve_equal_aggregated_with_kv_transferred(pair):
    for log in (pair["p_log"], pair["d_log"]):
        assert "staged through host memory (KV on cpu)" in log.read_text()
    reference = [_tokens(_complete(pair["p"], prompt)) for prompt in PROMPTS]
    ok0 = _kv(pair, "d", "splitserve_kv_transfers_total", outcome="ok")
    received0 = _kv(pair, "d", "splitserve_kv_transfer_bytes_total", direction="received")
    fallbacks0 = _kv(pair, "d", "splitserve_kv_transfer_fallbacks_total")
    for prompt, want in zip(PROMPTS, reference):
        assert _tokens(_complete(pair["proxy"], prompt)) == want
    # The prompts' blocks are now in D's prefix cache: asked again, D loads only the rest.
    assert _tokens(_complete(pair["proxy"], PROMPTS[2])) == reference[2]
    assert _kv(pair, "d", "splitserve_kv_transfers_total", outcome="ok") == ok0 + 4
    assert _kv(pair, "d", "splitserve_kv_transfer_bytes_total", direction="received") > received0
    assert _kv(pair, "p", "splitserve_kv_transfer_bytes_total", direction="sent") > 0
    assert _kv(pair, "d", "splitserve_kv_transfer_fallbacks_total") == fallbacks0
    _all_blocks_free(pair)
    # The long prompt's blocks went out while P was still computing it (chunked prefill).
    early = [int(n) for n in re.findall(r"handed to the sender, (\d+) of them while the prompt "
                                        r"was still computing", pair["p_log"].read_text())]
    assert max(early) > 0, early


def test_flipped_byte_is_sent_again(pair):
    want = _tokens(_complete(pair["p"], PROMPTS[2] + " Again."))
    failures0 = _kv(pair, "d", "splitserve_kv_transfer_checksum_failures_total")
    fallbacks0 = _kv(pair, "d", "splitserve_kv_transfer_fallbacks_total")
    with FaultProxy(("127.0.0.1", pair["kv_port"])) as fp:
        fp.flip_byte(400_000)
        assert _tokens(_pair_request(pair, PROMPTS[2] + " Again.", fp.address[1])) == want
        assert fp.flips == 1
    assert _kv(pair, "d", "splitserve_kv_transfer_checksum_failures_total") == failures0 + 1
    assert _kv(pair, "d", "splitserve_kv_transfer_fallbacks_total") == fallbacks0
    _all_blocks_free(pair)


def test_connection_reset_resumes(pair):
    prompt = "A different story. " + PROMPTS[2]
    want = _tokens(_complete(pair["p"], prompt))
    resumes0 = _kv(pair, "d", "splitserve_kv_transfer_resumes_total")
    fallbacks0 = _kv(pair, "d", "splitserve_kv_transfer_fallbacks_total")
    with FaultProxy(("127.0.0.1", pair["kv_port"])) as fp:
        fp.reset_after(600_000)
        assert _tokens(_pair_request(pair, prompt, fp.address[1])) == want
        assert fp.resets == 1
    assert _kv(pair, "d", "splitserve_kv_transfer_resumes_total") >= resumes0 + 1
    assert _kv(pair, "d", "splitserve_kv_transfer_fallbacks_total") == fallbacks0
    _all_blocks_free(pair)


def test_unreachable_prefill_is_a_counted_recompute(pair):
    prompt = "Nobody serves this prompt's KV. " + STORY
    want = _tokens(_complete(pair["p"], prompt))
    dead0 = _kv(pair, "d", "splitserve_kv_transfer_fallbacks_total", reason="peer_dead")
    tid = f"t-{uuid.uuid4().hex[:12]}"
    got = _complete(pair["d"], prompt, {"do_remote_prefill": True, "transfer_id": tid,
                                        "remote_host": "127.0.0.1", "remote_port": free_port()})
    assert _tokens(got) == want
    assert _kv(pair, "d", "splitserve_kv_transfer_fallbacks_total", reason="peer_dead") == dead0 + 1
    log = pair["d_log"].read_text()
    assert re.search(rf"request_id=\S+ transfer {tid}: KV load failed \(peer_dead\).*"
                     rf"recomputing the \d+ blocks that did not arrive", log), log[-3000:]
    _all_blocks_free(pair)


def test_prefill_lease_expires_when_no_decode_comes(pair):
    expired0 = _kv(pair, "p", "splitserve_kv_lease_expired_total")
    tid = f"t-{uuid.uuid4().hex[:12]}"
    _complete(pair["p"], "Abandoned. " + STORY, {"do_remote_decode": True, "transfer_id": tid}, 1)
    _wait(lambda: _kv(pair, "p", "splitserve_kv_lease_expired_total") == expired0 + 1,
          "the prefill side's lease to expire", timeout=LEASE * 10)
    assert re.search(rf"request_id=\S+ transfer {tid}: releasing \d+ KV blocks: lease expired",
                     pair["p_log"].read_text())
    _all_blocks_free(pair)


def test_prefill_killed_mid_transfer_recomputes_only_what_did_not_arrive(pair):
    """Last in the module: it kills the prefill server. The KV goes through a proxy that
    passes 16 MB (about 10 of the prompt's 53 blocks) and then holds the rest: P dies
    mid-transfer whatever the machine's speed (it cannot send the 78 MB past the socket
    buffers meanwhile); released, the proxy passes what P had sent, then P's end."""
    prompt = "A very long night. " + STORY * 40                  # ~1700 tokens, 50+ steps on P
    want = _tokens(_complete(pair["p"], prompt))
    fallbacks0 = _kv(pair, "d", "splitserve_kv_transfer_fallbacks_total")
    with FaultProxy(("127.0.0.1", pair["kv_port"])) as fp, ThreadPoolExecutor(1) as ex:
        fp.hold_after(16 << 20)
        decode = ex.submit(_pair_request_tolerating_p_death, pair, prompt, fp.address[1])
        _wait(fp.held.is_set, "the proxy to hold the rest of the KV", timeout=300)
        os.killpg(pair["p_proc"].pid, signal.SIGKILL)
        fp.stall(False)
        assert _tokens(decode.result()) == want
    _wait(lambda: _kv(pair, "d", "splitserve_kv_transfer_fallbacks_total") > fallbacks0,
          "the decode server to count the fallback")
    assert _kv(pair, "d", "splitserve_kv_transfer_fallbacks_total") == fallbacks0 + 1
    m = re.findall(r"KV load failed \((\w+)\).*recomputing the (\d+) blocks that did not "
                   r"arrive, reusing (\d+) verified", pair["d_log"].read_text())
    assert m and int(m[-1][2]) > 0 and int(m[-1][1]) > 0, m
    _wait(lambda: metric_value(pair["d"] + "/metrics", "vllm:kv_cache_usage_perc") == 0,
          "the decode server to free every KV block")


def _pair_request_tolerating_p_death(pair, prompt: str, kv_port: int) -> dict:
    tid = f"t-{uuid.uuid4().hex[:12]}"
    with ThreadPoolExecutor(1) as ex:
        p = ex.submit(_complete, pair["p"], prompt, {"do_remote_decode": True, "transfer_id": tid}, 1)
        d = _complete(pair["d"], prompt, {"do_remote_prefill": True, "transfer_id": tid,
                                          "remote_host": "127.0.0.1", "remote_port": kv_port})
        try:
            p.result()
        except (httpx.HTTPError, AssertionError):
            pass        # P was killed under its request
        return d
