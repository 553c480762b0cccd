"""`splitserve doctor logs FILE…` names each failure class in the logs of splitserve, vLLM
with NIXL, Dynamo and NIXL/UCX: class, count, first/last time, request ids, fix, exit
status, --json.

The foreign excerpts are in each system's own line format (vLLM's "WARNING 09-24
16:35:21 [file.py:N]", Dynamo's ISO timestamps with ANSI colour, UCX's epoch stamps).
splitserve's lines are produced by running the real transfer code (resets, a flipped
byte, a model mismatch, a wrong secret) and logging in `splitserve worker`'s format.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from fault_proxy import FaultProxy
from splitserve.cli.main import main
from splitserve.doctor.logs import scan
from splitserve.doctor.signatures import SIGNATURES, by_id
from splitserve.transfer import KVTransferServer, Outcome, TransferConfig, fetch_kv, kv_fingerprint
from splitserve.transfer.synthetic import SyntheticBackend, make_kv
from test_transfer_faults import FAST, NB, request

# The format `splitserve worker` logs in (splitserve/cli/logs.py).
WORKER_FORMAT = "%(asctime)s %(levelname)s [worker] %(name)s: %(message)s"

VLLM_PREFILL = """\
(EngineCore_DP0 pid=3747544) INFO 09-24 16:33:01 [nixl_connector.py:812] Starting listening on path: tcp://localhost:5600
(EngineCore_DP0 pid=3747544) WARNING 09-24 16:35:21 [nixl_connector.py:1048] Releasing expired KV blocks for request cmpl-3da205a6-1c3c-41b5-aeaa-b8421e81fd5c-0 which were retrieved by 0 decode worker(s) within 120 seconds.
(EngineCore_DP0 pid=3747544) INFO 09-24 16:35:30 [loggers.py:123] Engine 000: Avg prompt throughput: 0.0 tokens/s
(EngineCore_DP0 pid=3747544) WARNING 09-24 16:37:02 [nixl_connector.py:1048] Releasing expired KV blocks for request cmpl-efed6d02-710d-4f07-b643-ffb9a14f0858-0 which were retrieved by 0 decode worker(s) within 120 seconds.
(EngineCore_DP0 pid=3747544) WARNING 09-24 16:41:45 [nixl_connector.py:1048] Releasing expired KV blocks for request cmpl-0a1b2c3d-0000-4f07-b643-ffb9a14f0858-0 which were retrieved by 0 decode worker(s) within 120 seconds.
"""

VLLM_DECODE = """\
(EngineCore_DP0 pid=2211) ERROR 09-24 16:34:10 [nixl_connector.py:1620] NIXL transfer failure: handshake_setup_failed | Context: {'remote_engine_id': 'e1f2', 'remote_host': 'localhost', 'remote_port': 5600}
(EngineCore_DP0 pid=2211) ERROR 09-24 16:34:11 [core.py:700] RuntimeError: NIXL compatibility hash mismatch. Local: dbe01234, Remote: f2f65678. Prefill and decode instances have incompatible configurations.
(EngineCore_DP0 pid=2211) WARNING 09-24 16:34:12 [scheduler.py:1402] Recovered from KV load failure: 1 request(s) rescheduled (131072 tokens affected).
(APIServer pid=2200) ERROR 09-24 16:50:00 [serving_chat.py:220] Error in preprocessing prompt inputs
(APIServer pid=2200) ValueError: This model's maximum context length is 131072 tokens. However, you requested 144310 tokens (144054 in the messages, 256 in the completion). Please reduce the length of the messages or completion.
(APIServer pid=2200) ERROR 09-24 16:52:13 [serving_completion.py:145] ValueError: The decoder prompt (length 144054) is longer than the maximum model length of 131072. Make sure that `max_model_len` is no smaller than the number of text tokens.
"""

DYNAMO = (
    "\x1b[2m2025-05-13T13:47:38.880Z\x1b[0m \x1b[32m INFO\x1b[0m worker.generate: Prefilling remotely for request 5c23ec31 with length 3005\n"
    "2025-12-09T08:14:10.412Z ERROR dynamo_runtime::pipeline::network::tcp::client: reader task failed to join: JoinError::Panic \"fatal error - failed to decode message from stream; invalid line protocol: Io(Os { code: 104, kind: ConnectionReset, message: \\\"Connection reset by peer\\\" })\"\n"
    "2025-12-09T08:14:11.001Z ERROR dynamo_runtime::pipeline::network::tcp::client: failed to join writer task: I/O error: Broken pipe (os error 32)\n"
    "2025-12-09T08:19:44.250Z ERROR dynamo_runtime::pipeline::network::tcp::client: failed to join writer task: I/O error: Broken pipe (os error 32)\n"
    "2025-12-09T08:20:02.003Z  WARN dynamo_llm::kv_router::prefill_router: Remote prefill failed, falling back to decode-only. This may impact performance in disaggregated deployments. error=no instances found\n"
)

UCX = """\
[1765268050.123456] [gpu-node-7:4112 :0]           sock.c:344  UCX  ERROR recv(fd=61) failed: Connection reset by peer
[1765268112.654321] [gpu-node-7:4112 :0]        ucp_ep.c:1502 UCX  ERROR ep 0x7f3c: Endpoint timeout
2025-12-09 08:16:01 nixl_agent ERROR: transfer failed: NIXL_ERR_REMOTE_DISCONNECT
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def found(paths) -> dict:
    return {f.signature.id: f for f in scan(paths) if f.count}


def doctor(capsys, *argv) -> tuple[int, str]:
    rc = main(["doctor", "logs", *argv])
    return rc, capsys.readouterr().out


def test_vllm_prefill_expired_blocks_counted_with_times_and_request_ids(tmp_path, capsys):
    path = write(tmp_path, "prefill.log", VLLM_PREFILL)
    f = found([path])
    exp = f["kv_expired_unread"]
    assert exp.count == 3 and exp.by_system == {"vllm": 3}
    assert (exp.first.text, exp.last.text) == ("09-24 16:35:21", "09-24 16:41:45")
    assert exp.request_ids == ["cmpl-3da205a6-1c3c-41b5-aeaa-b8421e81fd5c-0",
                               "cmpl-efed6d02-710d-4f07-b643-ffb9a14f0858-0",
                               "cmpl-0a1b2c3d-0000-4f07-b643-ffb9a14f0858-0"]
    # A side channel on localhost is only a warning: right on one host.
    assert f["side_channel_on_loopback"].by_detail == {"localhost": 1}
    assert set(f) == {"kv_expired_unread", "side_channel_on_loopback"}

    rc, out = doctor(capsys, path)
    assert rc == 1
    assert "✘ prefill's KV expired before any decode worker read it" in out
    assert "3 line(s) (vllm: 3); first 09-24 16:35:21, last 09-24 16:41:45" in out
    assert "VLLM_NIXL_ABORT_REQUEST_TIMEOUT" in out                 # the fix is printed
    assert "! vLLM NIXL side channel listens on loopback" in out
    assert "✔ splitserve prefill released pinned KV: lease expired" in out


def test_vllm_decode_names_loopback_mismatch_recompute_and_context_limit(tmp_path):
    f = found([write(tmp_path, "decode.log", VLLM_DECODE)])
    assert f["loopback_advertised"].count == 1
    assert f["loopback_advertised"].by_detail == {"localhost": 1}
    assert f["handshake_mismatch"].count == 1
    assert f["silent_recompute"].count == 1 and f["silent_recompute"].by_detail == {"1": 1}
    ctx = f["context_limit"]
    # the ValueError line carries no time; the other one does
    assert ctx.count == 2 and ctx.by_detail == {"131072": 2}
    assert ctx.first.text == ctx.last.text == "09-24 16:52:13"
    assert "Error in preprocessing" not in ctx.example


def test_dynamo_resets_broken_pipes_and_decode_only_fallback(tmp_path):
    f = found([write(tmp_path, "dynamo.log", DYNAMO)])
    broken = f["stream_broken"]
    assert broken.count == 3 and broken.by_system == {"dynamo": 3}
    assert (broken.first.text, broken.last.text) == ("2025-12-09 08:14:10", "2025-12-09 08:19:44")
    assert f["silent_recompute"].count == 1 and f["silent_recompute"].by_system == {"dynamo": 1}
    assert set(f) == {"stream_broken", "silent_recompute"}   # the INFO line is no failure


def test_nixl_ucx_disconnects_with_epoch_times(tmp_path):
    f = found([write(tmp_path, "ucx.log", UCX)])
    broken = f["stream_broken"]
    assert broken.count == 3 and broken.by_system == {"nixl/ucx": 3}
    assert broken.by_detail == {"Connection reset": 1, "Endpoint timeout": 1}
    assert broken.first.text == "2025-12-09 08:14:10 UTC"
    assert broken.last.text == "2025-12-09 08:16:01"


@pytest.fixture
def splitserve_log(tmp_path):
    """A file the splitserve loggers write to in the worker's format, as in production."""
    path = tmp_path / "worker.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(WORKER_FORMAT))
    root = logging.getLogger("splitserve")
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield str(path)
    root.removeHandler(handler)
    root.setLevel(old)
    handler.close()


def test_splitserve_transfer_faults_from_the_real_code(splitserve_log, capsys):
    pkv, dkv = make_kv(80), make_kv(80)
    fp = kv_fingerprint(pkv)
    cfg = TransferConfig(transport="tcp", frame_bytes=2 * NB, **FAST)
    with KVTransferServer(pkv, fp, cfg, SyntheticBackend(pkv)) as server, \
            FaultProxy(server.address) as proxy:
        proxy.reset_after(100_000, times=2)
        r = fetch_kv(proxy.address, request("req-resets", 64), list(range(64)), dkv, cfg, fp)
        assert r.outcome is Outcome.OK and r.resumes == 2
    with KVTransferServer(pkv, fp, cfg, SyntheticBackend(pkv)) as server, \
            FaultProxy(server.address) as proxy:
        proxy.flip_byte(20 * (NB + 80) + NB // 2)
        r = fetch_kv(proxy.address, request("req-flip", 40), list(range(40)), dkv,
                     TransferConfig(transport="tcp", frame_bytes=NB, **FAST), fp)
        assert r.outcome is Outcome.OK and r.checksum_failures == 1
    other_fp = {**fp, "model": "another-model"}
    with KVTransferServer(pkv, other_fp, cfg, SyntheticBackend(pkv)) as server:
        r = fetch_kv(server.address, request("req-model", 4), list(range(4)), dkv, cfg, fp)
        assert r.outcome is Outcome.MISMATCH
    p_cfg = TransferConfig(transport="tcp", secret="right", **FAST)
    d_cfg = TransferConfig(transport="tcp", secret="wrong", **FAST)
    with KVTransferServer(pkv, fp, p_cfg, SyntheticBackend(pkv)) as server:
        r = fetch_kv(server.address, request("req-secret", 4), list(range(4)), dkv, d_cfg, fp)
        assert r.outcome is Outcome.AUTH_FAILED

    f = found([splitserve_log])
    assert f["kv_resumed"].count >= 2 and "req-resets" in f["kv_resumed"].request_ids
    assert f["kv_checksum"].request_ids == ["req-flip"]
    assert f["handshake_mismatch"].count == 2          # P's refusal and D's outcome
    assert f["handshake_mismatch"].by_detail == {"fingerprint": 1, "mismatch": 1}
    assert f["handshake_mismatch"].request_ids == ["req-model"]
    assert f["kv_auth_failed"].by_detail == {"auth_failed": 1}   # D checks P's proof first
    assert f["kv_auth_failed"].request_ids == ["req-secret"]
    # resets are resumed, not "broken streams"; nothing else is named
    assert set(f) == {"kv_resumed", "kv_checksum", "handshake_mismatch", "kv_auth_failed"}
    assert f["kv_auth_failed"].first.text[:4].isdigit()       # splitserve's dated stamps

    rc, out = doctor(capsys, splitserve_log)
    assert rc == 1
    assert "! splitserve KV connection broke mid-transfer and resumed" in out
    assert "✘ KV sessions refused: the shared secret differs" in out
    assert "SPLITSERVE_KV_SECRET" in out


# splitserve/worker/remote_prefill.py's and splitserve/transfer/server.py's WARNINGs, and
# WorkerConfig's refusal, in their exact words (they need a model engine or a minute of
# silence to happen for real).
SPLITSERVE_FALLBACKS = """\
2026-12-02 19:01:02,100 WARNING [worker] splitserve.worker.remote_prefill: request_id=chat-7#d1 KV transfer failed (peer_dead: 6 consecutive connection failures without progress, last: ConnectionRefusedError(111, 'Connection refused')); fallback 'local': reusing 0 verified blocks (0 tokens), computing the remaining 2000 of 2000 prompt tokens here
2026-12-02 19:03:02,200 WARNING [worker] splitserve.worker.remote_prefill: request_id=chat-8#d1 KV transfer failed (stalled: prefill silent for 30.0s); fallback 'local': reusing 3 verified blocks (48 tokens), computing the remaining 52 of 100 prompt tokens here
2026-12-02 19:04:00,000 WARNING [worker] splitserve.worker.remote_prefill: request_id=chat-9#d1 KV transfer failed (peer_dead: prefill refused (unknown_request): request chat-9#d1: nothing to resume); fallback policy 'fail': request refused, 7 reserved blocks freed
2026-12-02 19:05:00,500 WARNING [worker] splitserve.transfer.server: request chat-10#p1: releasing 9 pinned KV blocks: lease expired (decode disconnected, no ACK/HEARTBEAT for 60.2s, lease 60.0s); 0 bytes sent, decode verified 0/9 blocks
2026-12-02 19:06:00,000 ERROR [worker] splitserve.cli.worker_cmd: worker stopping: listening on all interfaces (0.0.0.0) but advertising '127.0.0.1' (--advertise-host), which resolves to a loopback address: workers on other hosts could not reach it
"""


def test_splitserve_fallbacks_by_reason_and_lease_expiry(tmp_path, capsys):
    path = write(tmp_path, "worker.log", SPLITSERVE_FALLBACKS)
    f = found([path])
    local = f["kv_fallback_local"]
    assert local.count == 2 and local.by_detail == {"peer_dead": 1, "stalled": 1}
    assert local.request_ids == ["chat-7#d1", "chat-8#d1"]
    assert (local.first.text, local.last.text) == ("2026-12-02 19:01:02", "2026-12-02 19:03:02")
    assert f["kv_fallback_fail"].request_ids == ["chat-9#d1"]
    lease = f["kv_lease_expired"]
    assert lease.request_ids == ["chat-10#p1"] and lease.by_detail == {"decode disconnected": 1}
    assert f["loopback_advertised"].by_system == {"splitserve": 1}
    assert set(f) == {"kv_fallback_local", "kv_fallback_fail", "kv_lease_expired",
                      "loopback_advertised"}

    rc, out = doctor(capsys, "--json", path)
    report = json.loads(out)
    assert rc == 1 and report["ok"] is False
    rows = {c["id"]: c for c in report["checks"]}
    assert set(rows) == {s.id for s in SIGNATURES}           # every class, found or not
    assert rows["kv_fallback_local"]["status"] == "fail"
    assert rows["kv_fallback_local"]["by_detail"] == {"peer_dead": 1, "stalled": 1}
    assert rows["kv_fallback_local"]["fix"] == by_id("kv_fallback_local").fix
    assert rows["kv_lease_expired"]["first"] == "2026-12-02 19:05:00"
    assert rows["stream_broken"]["status"] == "ok" and rows["stream_broken"]["count"] == 0


def test_clean_log_exits_zero_and_warnings_do_not_fail(tmp_path, capsys):
    clean = write(tmp_path, "clean.log", "2026-12-02 19:00:00,000 INFO [worker] x: ready\n")
    rc, out = doctor(capsys, clean)
    assert rc == 0 and "✘" not in out
    warn_only = write(tmp_path, "one-host.log", VLLM_PREFILL.splitlines()[0] + "\n")
    rc, out = doctor(capsys, warn_only)
    assert rc == 0 and "! vLLM NIXL side channel listens on loopback" in out


def test_several_files_are_counted_per_file(tmp_path, capsys):
    a = write(tmp_path, "p.log", VLLM_PREFILL)
    b = write(tmp_path, "d.log", DYNAMO)
    rc, out = doctor(capsys, a, b)
    assert rc == 1
    assert f"in {b}: 3" in out                                 # stream_broken's file


def test_unreadable_file_is_an_error_not_a_clean_bill(tmp_path, capsys):
    rc = main(["doctor", "logs", str(tmp_path / "missing.log")])
    assert rc == 2
    assert "cannot read" in capsys.readouterr().err


def test_command_line_entry_point(tmp_path):
    path = write(tmp_path, "dynamo.log", DYNAMO)
    p = subprocess.run([sys.executable, "-m", "splitserve", "doctor", "logs", "--json", path],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    assert json.loads(p.stdout)["ok"] is False
