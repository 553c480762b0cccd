"""Every row of the failure table, between real worker processes: what breaks, what the
decode worker does, what it counts — and that the request is still answered correctly
and no KV block is left behind."""

import re
import signal
import threading
import time

import pytest

from fault_proxy import FaultProxy
from golden import hf_greedy, random_prompt
from splitserve.worker import protocol as p
from workers import WorkerProc, generate, start_worker

NEW = 8


def via(proxy: FaultProxy, prefill: WorkerProc) -> WorkerProc:
    """A view of the prefill worker whose KV address is the proxy's."""
    info = p.WorkerInfo(**{**{f: getattr(prefill.info, f) for f in prefill.info.__struct_fields__},
                           "kv_host": proxy.address[0], "kv_port": proxy.address[1]})
    return WorkerProc(prefill.role, prefill.process, prefill.url, info, prefill.log_path)


def no_leaks(*workers: WorkerProc) -> None:
    for w in workers:
        if w.process.poll() is None:
            assert w.wait_metric("splitserve_kv_blocks_in_use", 0) == 0, w.log()[-3000:]


@pytest.fixture(scope="module")
def pair(tiny_llama_dir, tmp_path_factory):
    wd = tmp_path_factory.mktemp("faults")
    prefill = start_worker("prefill", tiny_llama_dir, wd)
    decode = start_worker("decode", tiny_llama_dir, wd, "--kv-transport", "tcp")
    yield prefill, decode
    no_leaks(prefill, decode)
    prefill.stop()
    decode.stop()


def test_resets_mid_transfer_resume_without_recompute(pair, tiny_llama_dir):
    prefill, decode = pair
    prompt = random_prompt(3000, seed=1)
    resumes = decode.metric("splitserve_kv_transfer_resumes_total")
    with FaultProxy((prefill.info.kv_host, prefill.info.kv_port)) as proxy:
        proxy.reset_after(200_000, times=3)
        status, tokens, chunks = generate(decode, "reset-1", prompt, NEW, via(proxy, prefill))
        assert proxy.resets == 3
    assert status == 200 and tokens == hf_greedy(tiny_llama_dir, prompt, NEW)
    assert chunks[-1].num_transferred_tokens == len(prompt)
    assert decode.metric("splitserve_kv_transfer_resumes_total") - resumes == 3
    assert decode.metric("splitserve_kv_transfer_fallbacks_total") == 0
    assert prefill.log().count("request reset-1: prefill of 3000 tokens started") == 1  # computed once


def test_flipped_byte_is_caught_and_resent(pair, tiny_llama_dir):
    prefill, decode = pair
    prompt = random_prompt(1000, seed=2)
    failures = decode.metric("splitserve_kv_transfer_checksum_failures_total")
    with FaultProxy((prefill.info.kv_host, prefill.info.kv_port)) as proxy:
        proxy.flip_byte(150_000)
        status, tokens, chunks = generate(decode, "flip-1", prompt, NEW, via(proxy, prefill))
        assert proxy.flips == 1
    assert status == 200 and tokens == hf_greedy(tiny_llama_dir, prompt, NEW)
    assert chunks[-1].num_transferred_tokens == len(prompt)
    assert decode.metric("splitserve_kv_transfer_checksum_failures_total") - failures == 1
    assert decode.metric("splitserve_kv_transfer_fallbacks_total") == 0


def test_short_stall_completes_without_fallback(tiny_llama_dir, tmp_path):
    prefill = start_worker("prefill", tiny_llama_dir, tmp_path, "--max-num-batched-tokens", "16")
    decode = start_worker("decode", tiny_llama_dir, tmp_path, "--kv-stall-timeout", "5")
    try:
        prompt = random_prompt(3000, seed=3)
        result = {}
        t = threading.Thread(target=lambda: result.update(r=generate(decode, "pause-1", prompt, NEW, prefill)))
        t.start()
        _wait_for(lambda: "request pause-1: prefill of" in prefill.log())
        prefill.stop(signal.SIGSTOP)
        time.sleep(1.0)
        prefill.process.send_signal(signal.SIGCONT)
        t.join(120)
        status, tokens, chunks = result["r"]
        assert status == 200 and tokens == hf_greedy(tiny_llama_dir, prompt, NEW)
        assert chunks[-1].num_transferred_tokens == len(prompt)
        assert decode.metric("splitserve_kv_transfer_fallbacks_total") == 0
        no_leaks(prefill, decode)
    finally:
        prefill.process.send_signal(signal.SIGCONT)
        prefill.stop()
        decode.stop()


def _wait_for(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _start_slow_transfer(decode, prefill, rid, prompt):
    """Start a request whose prefill takes a while (P computes 16 tokens per step) and
    return as soon as the decode worker has heard of progress: some blocks have arrived
    (P sends a chunk's blocks before its PROGRESS), most of the prompt is still to come.
    The decode worker must run with --log-level debug."""
    result = {}

    def run():
        try:
            result["r"] = generate(decode, rid, prompt, NEW, prefill)
        except Exception as e:  # the decode worker itself may be the one killed
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    _wait_for(lambda: re.search(rf"request {rid}: prefill progress [1-9]\d*/", decode.log()), timeout=60)
    return t, result


@pytest.mark.parametrize("policy", ["local", "fail"])
def test_prefill_killed_mid_prefill(policy, tiny_llama_dir, tmp_path):
    prefill = start_worker("prefill", tiny_llama_dir, tmp_path, "--max-num-batched-tokens", "16")
    decode = start_worker("decode", tiny_llama_dir, tmp_path, "--kv-fallback", policy, "--log-level", "debug")
    try:
        prompt = random_prompt(3500, seed=4)
        t, result = _start_slow_transfer(decode, prefill, "kill-p", prompt)
        prefill.stop(signal.SIGKILL)
        t.join(120)
        status, tokens, chunks = result["r"]
        assert decode.metric("splitserve_kv_transfer_fallbacks_total", reason="peer_dead") == 1
        assert "request_id=kill-p KV transfer failed (peer_dead" in decode.log()
        if policy == "local":
            assert status == 200 and tokens == hf_greedy(tiny_llama_dir, prompt, NEW)
            # Blocks that arrived verified were kept: fewer tokens recomputed than the prompt.
            assert 0 < chunks[-1].num_transferred_tokens < len(prompt)
            assert "fallback 'local': reusing" in decode.log()
        else:
            assert status == 502 and "peer_dead" in chunks and "fallback policy is 'fail'" in chunks
        no_leaks(decode)
    finally:
        prefill.stop(signal.SIGKILL)
        decode.stop()


def test_prefill_stalled_past_the_stall_timeout_falls_back(tiny_llama_dir, tmp_path):
    prefill = start_worker("prefill", tiny_llama_dir, tmp_path, "--max-num-batched-tokens", "16",
                           "--kv-lease", "2")
    decode = start_worker("decode", tiny_llama_dir, tmp_path, "--kv-stall-timeout", "1.5", "--log-level", "debug")
    try:
        prompt = random_prompt(3500, seed=5)
        t, result = _start_slow_transfer(decode, prefill, "stall-p", prompt)
        prefill.stop(signal.SIGSTOP)
        t.join(120)
        prefill.process.send_signal(signal.SIGCONT)
        status, tokens, chunks = result["r"]
        assert status == 200 and tokens == hf_greedy(tiny_llama_dir, prompt, NEW)
        assert 0 < chunks[-1].num_transferred_tokens < len(prompt)
        assert decode.metric("splitserve_kv_transfer_fallbacks_total", reason="stalled") == 1
        # P wakes up to a decode worker that left: it reads D's CANCEL or its lease has run
        # out (whichever its threads see first after SIGCONT) and lets go, exactly once.
        _wait_for(lambda: prefill.metric("splitserve_kv_lease_expired_total")
                  + prefill.metric("splitserve_kv_prefills_cancelled_total") == 1, timeout=30)
        no_leaks(prefill, decode)
    finally:
        prefill.process.send_signal(signal.SIGCONT)
        prefill.stop()
        decode.stop()


def test_decode_killed_prefill_lease_expires(tiny_llama_dir, tmp_path):
    prefill = start_worker("prefill", tiny_llama_dir, tmp_path, "--max-num-batched-tokens", "16",
                           "--kv-lease", "2")
    decode = start_worker("decode", tiny_llama_dir, tmp_path, "--log-level", "debug")
    try:
        t, result = _start_slow_transfer(decode, prefill, "kill-d", random_prompt(3500, seed=6))
        decode.stop(signal.SIGKILL)
        t.join(30)
        assert "error" in result   # the caller saw its decode worker go
        _wait_for(lambda: prefill.metric("splitserve_kv_lease_expired_total") == 1, timeout=30)
        warnings = [line for line in prefill.log().splitlines()
                    if "WARNING" in line and "kill-d" in line and "lease expired" in line]
        assert len(warnings) == 1 and "bytes sent" in warnings[0]
        no_leaks(prefill)
        assert prefill.metric("splitserve_kv_blocks_pinned") == 0
    finally:
        prefill.stop()
        decode.stop(signal.SIGKILL)


@pytest.mark.parametrize("policy", ["local", "fail"])
def test_model_mismatch_is_refused_naming_both_fingerprints(policy, tiny_llama_dir, tiny_qwen2_dir, tmp_path):
    prefill = start_worker("prefill", tiny_llama_dir, tmp_path)
    decode = start_worker("decode", tiny_qwen2_dir, tmp_path, "--kv-fallback", policy)
    try:
        prompt = random_prompt(100, seed=7)
        status, tokens, body = generate(decode, "mismatch", prompt, NEW, prefill)
        assert decode.metric("splitserve_kv_transfer_fallbacks_total", reason="mismatch") == 1
        message = body if policy == "fail" else decode.log()
        assert "LlamaForCausalLM" in message and "Qwen2ForCausalLM" in message
        if policy == "local":
            # Computed locally, by the decode worker's own model.
            assert status == 200 and tokens == hf_greedy(tiny_qwen2_dir, prompt, NEW)
            assert body[-1].num_transferred_tokens == 0
        else:
            assert status == 502
        no_leaks(prefill, decode)
    finally:
        prefill.stop()
        decode.stop()


def test_loopback_advertise_on_all_interfaces_is_refused(tiny_llama_dir):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "splitserve", "worker", "--role", "prefill", "--model", str(tiny_llama_dir),
         "--host", "0.0.0.0", "--advertise-host", "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "listening on all interfaces" in run.stderr and "loopback" in run.stderr


def test_kv_secret_authenticates_the_handshake(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITSERVE_KV_SECRET", "s3cret-one")
    prefill = start_worker("prefill", tiny_llama_dir, tmp_path)
    decode_ok = start_worker("decode", tiny_llama_dir, tmp_path, name="decode-ok")
    monkeypatch.setenv("SPLITSERVE_KV_SECRET", "not-the-s3cret-xq7")
    decode_bad = start_worker("decode", tiny_llama_dir, tmp_path, "--kv-fallback", "fail", name="decode-bad")
    try:
        prompt = random_prompt(200, seed=8)
        status, tokens, chunks = generate(decode_ok, "auth-ok", prompt, NEW, prefill)
        assert status == 200 and chunks[-1].num_transferred_tokens == len(prompt)
        status, _, body = generate(decode_bad, "auth-bad", prompt, NEW, prefill)
        assert status == 502 and "auth" in body
        assert decode_bad.metric("splitserve_kv_transfer_fallbacks_total", reason="auth_failed") == 1
        assert "s3cret" not in decode_bad.log() + prefill.log() and "xq7" not in prefill.log()
        no_leaks(prefill, decode_ok, decode_bad)
    finally:
        for w in (prefill, decode_ok, decode_bad):
            w.stop()
