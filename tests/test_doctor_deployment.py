"""`splitserve doctor --frontend URL | --discovery URL` against a real deployment: a
prefill worker on "host" 127.0.0.2, a decode worker on "host" 127.0.0.3, a frontend,
file discovery, one shared secret. Doctor is all ✔; then each injected fault is named,
with its worker: a worker advertising 127.0.0.1, a prefill worker serving another model,
a worker with another secret, a prefill worker whose KV port takes no connection, a
prompt over the context limit, a decode worker whose fetch fell back (the incident
carries the request id).

Each fault test adds its own worker to the shared discovery and removes it again, so the
base deployment is all ✔ before and after every test.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from golden import random_prompt
from procs import spawn
from splitserve.cli.main import main
from splitserve.worker import protocol as p
from splitserve.worker.auth import bearer
from workers import WorkerProc, generate, listed

SECRET = "doctor-test-secret"
MAX_LEN = "512"
P_HOST, D_HOST = "127.0.0.2", "127.0.0.3"


def _wait(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_worker(role: str, model: Path, workdir: Path, discovery: Path, name: str, host: str,
                 *extra: str, secret: str = SECRET) -> WorkerProc:
    proc, port, log = spawn(["worker", "--role", role, "--model", str(model), "--host", host,
                             "--discovery", f"file:{discovery}", "--worker-id", name,
                             "--kv-secret", secret, "--max-model-len", MAX_LEN, *extra],
                            workdir, name, 120)
    url = f"http://{host}:{port}"
    try:
        _wait(lambda: proc.poll() is not None or _healthy(url), f"{name} healthy", 120)
        assert proc.poll() is None, log.read_text()[-3000:]
        info = p.decode(httpx.get(f"{url}/info", headers=bearer(secret), timeout=5).content,
                        p.WorkerInfo)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return WorkerProc(role, proc, url, info, log, secret)


def no_blocks_in_use(w: WorkerProc) -> None:
    assert w.wait_metric("splitserve_kv_blocks_in_use", 0) == 0, w.log()[-3000:]


@pytest.fixture(scope="module")
def deployment(tiny_llama_dir, tmp_path_factory):
    wd = tmp_path_factory.mktemp("doctor")
    disc = wd / "discovery"
    disc.mkdir()
    prefill = start_worker("prefill", tiny_llama_dir, wd, disc, "p1", P_HOST)
    decode = start_worker("decode", tiny_llama_dir, wd, disc, "d1", D_HOST)
    fe, port, fe_log = spawn(["frontend", "--host", "127.0.0.1", "--discovery", f"file:{disc}",
                              "--kv-secret", SECRET], wd, "frontend", 120)
    frontend = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _healthy(frontend), "frontend healthy", 120)
        yield {"frontend": frontend, "discovery": f"file:{disc}", "dir": disc, "wd": wd,
               "prefill": prefill, "decode": decode}
    finally:
        fe.send_signal(signal.SIGTERM)
        fe.wait(20)
        for w in (prefill, decode):
            no_blocks_in_use(w)
            w.stop()


def doctor(capsys, *argv: str, bandwidth_mb: int = 0) -> tuple[int, dict]:
    rc = main(["doctor", *argv, "--kv-secret", SECRET, "--bandwidth-mb", str(bandwidth_mb),
               "--json"])
    return rc, json.loads(capsys.readouterr().out)


def failed(report: dict) -> list[tuple[str, str]]:
    return [(c["id"], c["subject"]) for c in report["checks"] if c["status"] == "fail"]


def test_healthy_deployment_is_all_green(deployment, capsys):
    rc, report = doctor(capsys, "--frontend", deployment["frontend"], bandwidth_mb=16)
    assert rc == 0 and report["ok"], failed(report)
    by_id = {}
    for c in report["checks"]:
        by_id.setdefault(c["id"], []).append(c)
    assert by_id["workers"][0]["title"].endswith("1 decode, 1 prefill")
    assert {c["subject"] for c in by_id["reachable"]} == {
        f"prefill worker p1 at http://{P_HOST}:{deployment['prefill'].url.rsplit(':', 1)[1]}",
        f"decode worker d1 at http://{D_HOST}:{deployment['decode'].url.rsplit(':', 1)[1]}"}
    [session] = by_id["kv_session"]
    assert session["subject"].startswith(f"decode d1 -> prefill p1 at {P_HOST}:")
    assert session["probe"]["outcome"] == "ok"
    assert all(c["status"] == "ok" for c in by_id["incidents"] + by_id["advertised"])
    # measured through the real protocol; from it, the longest prompt's KV time
    [bw] = by_id["bandwidth"]
    assert bw["subject"] == "prefill p1 -> decode d1"
    assert bw["bandwidth"]["bytes"] >= 15 << 20 and bw["bandwidth"]["bytes_per_s"] > 0
    assert bw["bandwidth"]["longest_prompt_tokens"] == int(MAX_LEN)
    assert "the KV of the longest prompt (512 tokens" in bw["title"]
    # the same through discovery, without the frontend
    rc, report = doctor(capsys, "--discovery", deployment["discovery"])
    assert rc == 0, failed(report)


def test_prompt_counted_with_the_chat_template_against_the_limit(deployment, capsys, tmp_path):
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text("hello " * 20)
    long.write_text("hello " * 600)
    rc, report = doctor(capsys, "--frontend", deployment["frontend"], "--prompt-file", str(short))
    [ctx] = [c for c in report["checks"] if c["id"] == "context"]
    assert rc == 0 and ctx["status"] == "ok" and "with the chat template" in ctx["title"]
    rc, report = doctor(capsys, "--frontend", deployment["frontend"], "--prompt-file", str(long))
    assert rc == 1 and failed(report) == [("context", "")]
    [ctx] = [c for c in report["checks"] if c["id"] == "context"]
    tokens = int(ctx["details"][0].split()[0])
    assert tokens > 600 and f">= max_model_len {MAX_LEN}" in ctx["details"][0]
    rc, report = doctor(capsys, "--discovery", deployment["discovery"], "--prompt-tokens", "600")
    assert rc == 1 and failed(report) == [("context", "")]


def test_worker_advertising_loopback_is_named(deployment, tiny_llama_dir, capsys):
    bad = start_worker("prefill", tiny_llama_dir, deployment["wd"], deployment["dir"], "p-lo",
                       P_HOST, "--advertise-host", "127.0.0.1")
    try:
        _wait(lambda: listed(deployment["dir"], "p-lo"), "p-lo registered")
        rc, report = doctor(capsys, "--discovery", deployment["discovery"])
        port = bad.url.rsplit(":", 1)[1]
        subject = f"prefill worker p-lo at http://127.0.0.1:{port}"
        assert rc == 1
        assert set(failed(report)) == {("reachable", subject), ("advertised", subject),
                                       ("kv_session", f"decode d1 -> prefill p-lo at 127.0.0.1:"
                                                      f"{bad.info.kv_port}")}
        [adv] = [c for c in report["checks"] if c["id"] == "advertised" and c["status"] == "fail"]
        assert "127.0.0.1" in adv["details"][0] and "--advertise-host" in adv["fix"]
        [kv] = [c for c in report["checks"] if c["id"] == "kv_session" and c["status"] == "fail"]
        assert kv["probe"]["outcome"] == "unreachable"
        # Through the frontend (which could never reach it either) the same address is named.
        _wait(lambda: len(httpx.get(f"{deployment['frontend']}/cluster").json()["workers"]) == 3,
              "the frontend lists p-lo")
        rc, report = doctor(capsys, "--frontend", deployment["frontend"])
        assert rc == 1
        [adv] = [c for c in report["checks"] if c["id"] == "advertised" and c["status"] == "fail"]
        assert f"http://127.0.0.1:{port}" in adv["subject"]
        assert "API address 127.0.0.1 (this machine only)" in adv["details"][0]
    finally:
        bad.stop()
    _wait(lambda: not (deployment["dir"] / "p-lo.json").exists(), "p-lo deregistered")


def test_prefill_worker_with_another_model_is_named(deployment, tiny_qwen2_dir, capsys):
    other = start_worker("prefill", tiny_qwen2_dir, deployment["wd"], deployment["dir"],
                         "p-qwen", P_HOST)
    try:
        _wait(lambda: listed(deployment["dir"], "p-qwen"), "p-qwen registered")
        rc, report = doctor(capsys, "--discovery", deployment["discovery"])
        assert rc == 1
        assert failed(report) == [("kv_session", f"decode d1 -> prefill p-qwen at {P_HOST}:"
                                                 f"{other.info.kv_port}")]
        [kv] = [c for c in report["checks"] if c["status"] == "fail"]
        assert kv["probe"]["outcome"] == "mismatch"
        assert "fingerprint mismatch" in kv["details"][0] and "--model" in kv["fix"]
    finally:
        other.stop()
        no_blocks_in_use(deployment["decode"])
    _wait(lambda: not (deployment["dir"] / "p-qwen.json").exists(), "p-qwen deregistered")


def test_worker_with_another_secret_is_named(deployment, tiny_llama_dir, capsys):
    other = start_worker("prefill", tiny_llama_dir, deployment["wd"], deployment["dir"],
                         "p-secret", P_HOST, secret="not-the-deployment-secret")
    try:
        _wait(lambda: listed(deployment["dir"], "p-secret"), "p-secret registered")
        rc, report = doctor(capsys, "--discovery", deployment["discovery"])
        subject = f"prefill worker p-secret at {other.url}"
        assert rc == 1
        assert set(failed(report)) == {
            ("reachable", subject),
            ("kv_session", f"decode d1 -> prefill p-secret at {P_HOST}:{other.info.kv_port}")}
        by = {c["id"]: c for c in report["checks"] if c["status"] == "fail"}
        assert "refuses doctor's secret" in by["reachable"]["details"][0]
        assert by["kv_session"]["probe"]["outcome"] == "auth_failed"
        assert "SPLITSERVE_KV_SECRET" in by["kv_session"]["fix"]
    finally:
        other.stop()
    _wait(lambda: not (deployment["dir"] / "p-secret.json").exists(), "p-secret deregistered")


def keep_listed(discovery: Path, worker_id: str, source: str | None = None, **changes) -> None:
    """Writes worker_id's record (source's record with changes, or its own) with a
    heartbeat an hour ahead: listed for the whole test with no process heartbeating it,
    however slow the machine (the test unlinks it)."""
    record = json.loads((discovery / f"{source or worker_id}.json").read_text())
    record.update(worker_id=worker_id, last_heartbeat=time.time() + 3600, **changes)
    staged = discovery / f"{worker_id}.tmp"
    staged.write_text(json.dumps(record))
    staged.replace(discovery / f"{worker_id}.json")    # readers never see half a file


def test_prefill_worker_whose_kv_port_is_blocked_is_named(deployment, capsys):
    # A prefill worker whose API answers while its KV port takes no connection: p1's own
    # record, re-registered as p-blocked with its KV port on a socket that is bound but
    # never listens (connections to it are refused, and no other process can take it).
    blocked = socket.socket()
    blocked.bind((P_HOST, 0))
    kv_port = blocked.getsockname()[1]
    keep_listed(deployment["dir"], "p-blocked", "p1", kv_port=kv_port)
    try:
        rc, report = doctor(capsys, "--discovery", deployment["discovery"])
        decoders = [c["subject"].split()[2] for c in report["checks"]
                    if c["id"] == "reachable" and c["subject"].startswith("decode worker")]
        assert rc == 1 and decoders == ["d1"]
        assert failed(report) == [("kv_session", f"decode {d} -> prefill p-blocked at "
                                                 f"{P_HOST}:{kv_port}") for d in ("d1",)]
        [kv] = [c for c in report["checks"] if c["status"] == "fail"]
        assert kv["probe"]["outcome"] == "unreachable"
        assert kv["details"][0].startswith("unreachable: ")
        assert "--kv-port" in kv["fix"]
        # Its API is fine: reachable and advertised are ✔ for p-blocked.
        assert {c["id"] for c in report["checks"] if "p-blocked" in c["subject"]
                and c["status"] == "ok"} >= {"reachable", "advertised"}
    finally:
        (deployment["dir"] / "p-blocked.json").unlink()
        blocked.close()
        no_blocks_in_use(deployment["decode"])


def test_decode_fallback_appears_with_its_request_id(deployment, tiny_llama_dir, capsys):
    # Its own decode worker, so the shared one keeps no incident for the other tests.
    decode = start_worker("decode", tiny_llama_dir, deployment["wd"], deployment["dir"], "d-fb",
                          D_HOST)
    gone = start_worker("prefill", tiny_llama_dir, deployment["wd"], deployment["dir"],
                        "p-gone", P_HOST)
    try:
        _wait(lambda: listed(deployment["dir"], "p-gone"), "p-gone registered")
        gone.stop(signal.SIGKILL)          # a dead worker whose record is still listed
        keep_listed(deployment["dir"], "p-gone")
        status, tokens, _ = generate(decode, "doctor-fallback-1", random_prompt(100, seed=9), 4,
                                     gone)
        assert status == 200 and len(tokens) == 4   # answered: computed on the decode worker
        rc, report = doctor(capsys, "--discovery", deployment["discovery"])
        assert rc == 1
        by = {(c["id"], c["subject"]): c for c in report["checks"] if c["status"] == "fail"}
        kv = f"prefill p-gone at {P_HOST}:{gone.info.kv_port}"
        assert set(by) == {("reachable", f"prefill worker p-gone at {gone.url}"),
                           ("kv_session", f"decode d1 -> {kv}"),
                           ("kv_session", f"decode d-fb -> {kv}"),
                           ("incidents", f"decode worker d-fb at {decode.url}")}
        incidents = by[("incidents", f"decode worker d-fb at {decode.url}")]
        assert any("fallback (peer_dead) request doctor-fallback-1 from p-gone" in line
                   for line in incidents["details"]), incidents["details"]
        assert incidents["incidents"]["counts"]["fallback:peer_dead"] == 1
    finally:
        (deployment["dir"] / "p-gone.json").unlink(missing_ok=True)
        no_blocks_in_use(decode)
        decode.stop()
    _wait(lambda: not (deployment["dir"] / "d-fb.json").exists(), "d-fb deregistered")


def test_slow_link_is_a_warning_naming_the_time_of_the_longest_prompt(monkeypatch):
    # The arithmetic alone, with the workers' answers faked: 1 MB/s, 8192-token prompts.
    from splitserve.doctor import bandwidth
    from splitserve.doctor.deployment import Worker

    server = {"probe_port": 9, "block_shape": [2, 2, 16, 2, 16], "dtype": "float32",
              "block_size": 16, "max_model_len": 8192, "lease": 60.0}
    measured = {"outcome": "ok", "reason": "", "transport": "tcp", "bytes": 1 << 20,
                "seconds": 1.0, "bytes_per_s": 1e6, "stall_timeout": 1.0}
    answers = {"kv_probe_server": server, "kv_bandwidth": measured}
    monkeypatch.setattr(bandwidth.httpx, "post", lambda url, **kw: httpx.Response(
        200, json=answers[url.rsplit("/", 1)[1]], request=httpx.Request("POST", url)))
    monkeypatch.setattr(bandwidth.httpx, "delete", lambda url, **kw: None)
    d = Worker("d1", "decode", "http://d", None, None)
    p1 = Worker("p1", "prefill", "http://p", "10.0.0.2", 7000)
    check = bandwidth.check_bandwidth(d, p1, None, 1 << 20)
    # 512 blocks of 2*2*16*2*16*4 bytes = 4 MiB: 4.19 s at 1 MB/s, over the 1 s stall timeout
    assert check.status == "warn" and check.subject == "prefill p1 -> decode d1"
    assert "(8192 tokens, 4.2 MB) takes 4.19s (kv stall timeout 1s, kv lease 60s)" in check.details[0]
    assert "--kv-stall-timeout" in check.fix
