"""No stranger can use or stop a worker: the worker API wants the deployment's secret, a
decode worker fetches KV only from prefill workers it knows (never from an address a
request names), hostile KV frames leave the engine serving, and a caller that leaves
while its KV is on the way takes its reservation and the prefill with it."""

import ast
import socket
import threading
import time

import httpx
import msgspec
import pytest

from golden import hf_greedy, random_prompt
from splitserve.transfer import protocol as proto
from splitserve.worker import protocol as p
from workers import WorkerProc, generate, start_worker

NEW = 4


def wait_for(cond, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not (result := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


def no_leaks(*workers: WorkerProc) -> None:
    for w in workers:
        assert w.wait_metric("splitserve_kv_blocks_in_use", 0) == 0, w.log()[-3000:]


def target(worker_id: str, host: str, port: int) -> p.PrefillTarget:
    return p.PrefillTarget(worker_id, host, port)


def post_generate(d: WorkerProc, req: p.GenerateRequest, headers=None) -> httpx.Response:
    return httpx.post(f"{d.url}/generate", content=p.encode(req), timeout=60,
                      headers={"content-type": "application/json", **(headers or {})})


def test_worker_api_requires_the_deployment_secret(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITSERVE_KV_SECRET", "s3cret-api")
    prefill = start_worker("prefill", tiny_llama_dir, tmp_path)
    decode = start_worker("decode", tiny_llama_dir, tmp_path)
    try:
        req = p.GenerateRequest("auth-1", random_prompt(40, seed=1),
                                p.SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True),
                                prefill.target())
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": "s3cret-api"}):
            r = post_generate(decode, req, headers)
            assert r.status_code == 401, r.text
            assert "s3cret" not in r.text and r.json()["code"] == "unauthorized"
        for path in ("/info", "/stats", "/kv_events"):
            assert httpx.get(f"{prefill.url}{path}", timeout=10).status_code == 401
        # Probes and metrics stay open; the refusals were counted.
        for path in ("/live", "/health", "/metrics"):
            assert httpx.get(f"{decode.url}{path}", timeout=10).status_code == 200
        assert decode.metric("splitserve_worker_api_unauthorized_total") == 3
        status, tokens, _ = generate(decode, "auth-2", req.prompt_token_ids, NEW, prefill)
        assert status == 200 and tokens == hf_greedy(tiny_llama_dir, req.prompt_token_ids, NEW)
        no_leaks(prefill, decode)
    finally:
        prefill.stop()
        decode.stop()


def test_decode_connects_only_to_prefill_workers_from_discovery(tiny_llama_dir, tmp_path):
    url = f"file:{tmp_path / 'registry'}"
    prefill = start_worker("prefill", tiny_llama_dir, tmp_path, "--discovery", url,
                           "--worker-id", "p-known")
    decode = start_worker("decode", tiny_llama_dir, tmp_path, "--discovery", url,
                          "--worker-id", "d-1")
    # A stranger's listener: the decode worker must never connect to it.
    with socket.create_server(("127.0.0.1", 0)) as trap:
        trap.settimeout(0.1)
        host, port = trap.getsockname()[:2]
        try:
            prompt = random_prompt(64, seed=2)
            sampling = p.SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
            r = post_generate(decode, p.GenerateRequest("unknown-p", prompt, sampling,
                                                        target("p-stranger", host, port)))
            assert r.status_code == 400 and r.json()["code"] == "unknown_prefill_worker", r.text
            # A known worker id with another address: discovery's address wins.
            r = post_generate(decode, p.GenerateRequest("moved-p", prompt, sampling,
                                                        target("p-known", host, port)))
            assert r.status_code == 200, r.text
            chunks = [msgspec.json.decode(line, type=p.GenerateChunk)
                      for line in r.text.splitlines() if line]
            assert [t for c in chunks for t in c.new_token_ids] == hf_greedy(tiny_llama_dir, prompt, NEW)
            assert chunks[-1].num_transferred_tokens == len(prompt)
            with pytest.raises(socket.timeout):
                trap.accept()
        finally:
            no_leaks(prefill, decode)
            prefill.stop()
            decode.stop()


def test_decode_without_discovery_fetches_only_from_listed_peers(tiny_llama_dir, tmp_path):
    prefill = start_worker("prefill", tiny_llama_dir, tmp_path)
    decode = start_worker("decode", tiny_llama_dir, tmp_path, "--kv-peers", "127.0.0.2")
    try:
        r = post_generate(decode, p.GenerateRequest(
            "not-listed", random_prompt(40, seed=3),
            p.SamplingParams(max_tokens=NEW, temperature=0.0), prefill.target()))
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["code"] == "unknown_prefill_worker" and "127.0.0.2" in body["message"]
        assert prefill.metric("splitserve_kv_transfer_bytes_total", direction="sent") == 0
        no_leaks(prefill, decode)
    finally:
        prefill.stop()
        decode.stop()


def _raw_prefill(prefill: WorkerProc, frame_body: dict) -> proto.Msg | None:
    """Handshake with prefill's KV port as a stranger, send one PREFILL built by hand,
    return P's first answer (None: it closed the session)."""
    with socket.create_connection((prefill.info.kv_host, prefill.info.kv_port), timeout=30) as sock:
        ch = proto.Channel(sock)
        ch.send(proto.Hello(proto.VERSION, b"n" * 16))
        assert isinstance(ch.recv()[0], proto.Challenge)
        fp = {}   # learn P's fingerprint the way a stranger could without a secret
        ch.send(proto.Session(fp, ["tcp"], "x"))
        refuse, _ = ch.recv()
        assert isinstance(refuse, proto.Refuse) and refuse.code == "fingerprint"
    fingerprint = ast.literal_eval(refuse.reason.split("prefill has ", 1)[1].split(", decode has")[0])
    with socket.create_connection((prefill.info.kv_host, prefill.info.kv_port), timeout=30) as sock:
        ch = proto.Channel(sock)
        ch.send(proto.Hello(proto.VERSION, b"n" * 16))
        ch.recv()
        ch.send(proto.Session(fingerprint, ["tcp"], "x"))
        assert isinstance(ch.recv()[0], proto.HelloOk)
        head = msgspec.msgpack.encode(frame_body)
        sock.sendall(proto.PREFIX.pack(proto.MAGIC, proto.VERSION, 0, len(head), 0) + head)
        try:
            while True:
                msg, _ = ch.recv()
                if not isinstance(msg, proto.Progress):
                    return msg
        except (proto.PeerClosed, OSError):
            return None


@pytest.mark.parametrize("sampling,tokens,expect", [
    ({"stop_token_ids": [[1]]}, list(range(1, 17)), "closed"),
    ({"temperature": float("nan")}, list(range(1, 17)), "closed"),
    ({"stop_token_ids": [10 ** 6]}, list(range(1, 17)), "error"),      # outside the vocabulary
    ({}, [10 ** 6] * 16, "error"),                                     # prompt outside it
])
def test_hostile_kv_frames_leave_the_prefill_engine_serving(tiny_llama_dir, tmp_path, sampling,
                                                            tokens, expect):
    prefill = start_worker("prefill", tiny_llama_dir, tmp_path)
    decode = start_worker("decode", tiny_llama_dir, tmp_path)
    try:
        answer = _raw_prefill(prefill, {"type": "prefill", "request_id": "evil", "token_ids": tokens,
                                        "sampling": sampling, "num_blocks": 1,
                                        "resume_from_block": 0})
        if expect == "closed":
            assert answer is None
        else:
            assert isinstance(answer, proto.Error) and "vocabulary" in answer.reason, answer
        assert httpx.get(f"{prefill.url}/health", timeout=10).status_code == 200
        prompt = random_prompt(100, seed=4)
        status, out, _ = generate(decode, "after-evil", prompt, NEW, prefill)
        assert status == 200 and out == hf_greedy(tiny_llama_dir, prompt, NEW)
        no_leaks(prefill, decode)
    finally:
        prefill.stop()
        decode.stop()


def test_caller_leaving_during_a_queued_fetch_frees_everything(tiny_llama_dir, tmp_path):
    # P computes slowly (tiny chunks): a second request waits in its queue. Its caller
    # leaves: the decode worker cancels the fetch at once and frees the reservation, and
    # P drops the queued prefill without computing it.
    prefill = start_worker("prefill", tiny_llama_dir, tmp_path, "--max-num-batched-tokens", "16",
                           "--max-num-seqs", "1")
    decode = start_worker("decode", tiny_llama_dir, tmp_path, "--log-level", "debug")
    try:
        busy = random_prompt(3000, seed=5)
        first = {}
        t = threading.Thread(target=lambda: first.update(r=generate(decode, "first", busy, NEW, prefill)))
        t.start()
        wait_for(lambda: "request first: prefill progress" in decode.log(), what="first running")
        req = p.GenerateRequest("leaver", random_prompt(500, seed=6),
                                p.SamplingParams(max_tokens=NEW, temperature=0.0), prefill.target())
        body = p.encode(req)
        port = int(decode.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                           b"content-length: %d\r\n\r\n" % len(body) + body)
            wait_for(lambda: "request leaver: prefill progress 0/500 tokens (queue position 1"
                     in decode.log(), what="leaver queued behind first")
        # The client is gone before any answer.
        wait_for(lambda: "request leaver: decode gave up" in prefill.log(), what="P drops leaver")
        assert "still queued, not started" in prefill.log()
        assert prefill.metric("splitserve_kv_prefills_cancelled_total") == 1
        assert decode.metric("splitserve_kv_transfers_total", outcome="cancelled") == 1
        assert decode.metric("splitserve_kv_transfer_fallbacks_total") == 0
        t.join(300)
        status, tokens, _ = first["r"]
        assert status == 200 and tokens == hf_greedy(tiny_llama_dir, busy, NEW)
        no_leaks(prefill, decode)
    finally:
        prefill.stop()
        decode.stop()
