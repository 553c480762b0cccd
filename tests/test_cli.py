"""The `splitserve` command line: flags and defaults from the config dataclass, and
`serve`'s supervision of its child processes (clean stop, a dying child without restarts
left, no orphans; restarts are in test_serve_supervision)."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time

import httpx
import pytest

from live_server import child_pids, pid_alive, start_serve
from splitserve.cli.engine_args import engine_argv, engine_config_from_args
from splitserve.cli.main import build_parser
from splitserve.cli.discovery_args import discovery_argv, discovery_config
from splitserve.cli.engine_args import transfer_argv, worker_config_from_args
from splitserve.cli.frontend_args import frontend_argv, frontend_config_from_args
from splitserve.cli.supervision_args import restart_policy_from_args
from splitserve.cli.supervisor import RestartPolicy
from splitserve.cli.serve_cmd import _check_discovery, _worker_argv, _worker_roles
from splitserve.config import EngineConfig, defaults
from splitserve.discovery.config import DiscoveryConfig
from splitserve.frontend.config import FrontendConfig
from splitserve.router import RouterConfig
from splitserve.discovery.etcd_store import EtcdDiscoveryConfig
from splitserve.discovery.file_store import FileDiscoveryConfig
from splitserve.transfer.config import TransferConfig
from splitserve.worker.config import WorkerConfig


def _config(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    return engine_config_from_args(args.parser, args)


def test_engine_flag_defaults_come_from_engine_config():
    assert dataclasses.asdict(_config(["worker"])) == defaults(EngineConfig)


def test_transfer_worker_and_discovery_flag_defaults_come_from_their_configs():
    args = build_parser().parse_args(["worker"])
    assert worker_config_from_args(args.parser, args) == WorkerConfig()
    assert discovery_config(args.parser, args) == DiscoveryConfig()
    # One TTL default for the flag and every backend.
    assert DiscoveryConfig().ttl_s == EtcdDiscoveryConfig("h").ttl_s == FileDiscoveryConfig("d").ttl_s


def test_transfer_flags_round_trip_through_a_child_command_line():
    args = build_parser().parse_args([
        "serve", "--kv-transport", "shm", "--kv-stall-timeout", "7.5", "--kv-busy-timeout", "60",
        "--kv-lease", "20", "--kv-fallback", "fail", "--advertise-host", "10.1.2.3",
        "--kv-fetch-threads", "3", "--kv-peers", "10.1.2.4:9000,10.1.2.5"])
    child = build_parser().parse_args(["worker", *transfer_argv(args)])
    expected = WorkerConfig(advertise_host="10.1.2.3", kv_fallback="fail", kv_fetch_threads=3,
                            kv_peers=("10.1.2.4:9000", "10.1.2.5"),
                            transfer=TransferConfig(transport="shm", stall_timeout=7.5,
                                                    busy_timeout=60.0, lease=20.0,
                                                    heartbeat_interval=2.5))
    assert worker_config_from_args(child.parser, child) == expected


def test_frontend_and_supervision_flags_come_from_their_configs_and_reach_serves_frontend(monkeypatch):
    monkeypatch.delenv("SPLITSERVE_API_KEY", raising=False)
    args = build_parser().parse_args(["serve"])
    assert frontend_config_from_args(args.parser, args) == FrontendConfig()
    assert restart_policy_from_args(args.parser, args) == RestartPolicy()
    args = build_parser().parse_args([
        "serve", "--router", "random", "--kv-overlap-weight", "2.5", "--migration-limit", "1",
        "--max-queued-requests", "7", "--queue-timeout", "9", "--prefill-overflow", "queue",
        "--max-prefill-wait", "3", "--reasoning-parser", "qwen3", "--tool-call-parser", "hermes",
        "--enable-auto-tool-choice", "--tokenizer", "/t", "--max-request-bytes", "1000",
        "--api-key", "k3y", "--max-restarts", "2", "--restart-window", "60"])
    config = frontend_config_from_args(args.parser, args)
    assert config.router == RouterConfig("random", 2.5) and config.max_prefill_wait_s == 3.0
    assert restart_policy_from_args(args.parser, args) == RestartPolicy(2, 60.0)
    argv = frontend_argv(args)
    assert "k3y" not in argv   # the key travels in the child's environment
    child = build_parser().parse_args(["frontend", *argv])
    assert frontend_config_from_args(child.parser, child) == dataclasses.replace(config, api_key=None)


def test_engine_flags_round_trip_through_a_child_command_line():
    config = _config(["serve", "--model", "/m", "--kv-cache-memory", "2GiB", "--block-size", "32",
                      "--max-model-len", "1024", "--dtype", "bfloat16", "--no-enable-prefix-caching",
                      "--served-model-name", "m", "--max-num-seqs", "8", "--max-num-batched-tokens", "256"])
    assert config.kv_cache_memory == 2 * 1024**3 and config.enable_prefix_caching is False
    assert _config(["worker", *engine_argv(config)]) == config


def test_invalid_engine_flags_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        _config(["serve", "--block-size", "24"])
    assert e.value.code == 2 and "block_size must be a positive power of two" in capsys.readouterr().err


def _serve(argv):
    parser = build_parser()
    args = parser.parse_args(["serve", *argv])
    return args.parser, args


def test_serve_is_one_prefill_and_one_decode_worker_by_default():
    assert _worker_roles(*_serve([])) == [("prefill-0", "prefill"), ("decode-0", "decode")]
    assert _worker_roles(*_serve(["--prefill", "2", "--decode", "3"])) == [
        ("prefill-0", "prefill"), ("prefill-1", "prefill"),
        ("decode-0", "decode"), ("decode-1", "decode"), ("decode-2", "decode")]
    assert _worker_roles(*_serve(["--aggregated"])) == [("worker", "both")]


@pytest.mark.parametrize("argv, message", [
    (["--aggregated", "--decode", "1"], "--aggregated runs one `both` worker"),
    (["--decode", "0"], "--decode must be at least 1"),
    (["--kv-lease", "0"], "lease must be > 0"),
])
def test_inconsistent_serve_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _worker_roles(*_serve(argv))
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--discovery", "static:http://127.0.0.1:1"], "workers register themselves"),
    (["--discovery", "zk://x"], "unknown discovery scheme"),
    (["--discovery-ttl", "0"], "--discovery-ttl must be positive"),
])
def test_unusable_serve_discovery_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _check_discovery(*_serve(argv))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_frontend_flags_become_its_config():
    from splitserve.cli.frontend_args import frontend_config_from_args, frontend_argv

    parser, args = _serve(["--router", "round-robin", "--kv-overlap-weight", "2.5",
                           "--migration-limit", "1"])
    config = frontend_config_from_args(parser, args)
    assert (config.router.policy, config.router.overlap_weight, config.migration_limit) == (
        "round-robin", 2.5, 1)
    frontend = build_parser().parse_args(["frontend", "--discovery", "file:/d", *frontend_argv(args)])
    assert frontend_config_from_args(frontend.parser, frontend) == config
    assert _serve([])[1].router == "kv"    # the default policy

def test_serve_passes_engine_and_transfer_flags_to_its_workers_but_not_the_secret(tmp_path):
    parser, args = _serve(["--block-size", "32", "--kv-transport", "tcp", "--kv-stall-timeout", "5",
                           "--kv-lease", "12", "--kv-fallback", "fail", "--kv-secret", "s3cret",
                           "--advertise-host", "10.0.0.7"])
    config = engine_config_from_args(parser, args)
    discovery = discovery_argv("etcd://10.0.0.9:2379", _serve(
        ["--namespace", "prod", "--discovery-ttl", "4"])[1])
    prefill = _worker_argv("prefill", tmp_path / "p.port", args, config, discovery, "prefill-0-h-1")
    decode = _worker_argv("decode", tmp_path / "d.port", args, config, discovery, "decode-0-h-1")
    assert "s3cret" not in prefill + decode  # it travels in the environment
    worker = build_parser().parse_args(prefill[3:])  # argv: python -m splitserve worker ...
    assert (worker.role, worker.host, worker.port, worker.kv_port, worker.worker_id) == (
        "prefill", "127.0.0.1", 0, 0, "prefill-0-h-1")
    assert (worker.discovery, worker.namespace, worker.discovery_ttl) == ("etcd://10.0.0.9:2379", "prod", 4)
    assert (worker.kv_transport, worker.kv_stall_timeout, worker.kv_lease, worker.kv_fallback,
            worker.advertise_host) == ("tcp", 5.0, 12.0, "fail", "10.0.0.7")
    assert engine_config_from_args(worker.parser, worker) == config
    assert build_parser().parse_args(decode[3:]).role == "decode" and "--kv-port" not in decode


def test_help_does_not_import_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "splitserve", "--help"],
                         capture_output=True, text=True, check=True)
    assert "serve" in out.stdout
    assert not any(line.rsplit("|", 1)[-1].strip() == "torch" for line in out.stderr.splitlines())


def _wait_gone(pids, timeout=20.0):
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def test_serve_supervision_aggregated(tiny_llama_dir, tmp_path):
    # SIGTERM: every child stops and serve exits 0.
    (tmp_path / "a").mkdir()
    srv = start_serve(tiny_llama_dir, tmp_path / "a", "--aggregated")
    children = child_pids(srv.process.pid)
    assert len(children) == 2
    assert srv.stop(signal.SIGTERM) == 0
    assert _wait_gone(children) == []

    # A child that dies with no restart allowed takes serve down, with a message naming it.
    (tmp_path / "b").mkdir()
    srv = start_serve(tiny_llama_dir, tmp_path / "b", "--aggregated", "--max-restarts", "0")
    by_part = {open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[3].decode(): pid
               for pid in child_pids(srv.process.pid)}  # argv: python -m splitserve PART ...
    worker, frontend = by_part["worker"], by_part["frontend"]
    subprocess.run(["kill", "-KILL", str(worker)], check=True)
    assert srv.process.wait(30) == 1
    assert (f"worker (pid {worker}) was killed by SIGKILL; it exited 1 times within 300s (exit "
            f"codes: SIGKILL), more than the 0 restarts allowed") in srv.log()
    assert _wait_gone([frontend]) == []

    # serve itself killed: the kernel takes the children down too (no orphans).
    (tmp_path / "c").mkdir()
    srv = start_serve(tiny_llama_dir, tmp_path / "c", "--aggregated")
    children = child_pids(srv.process.pid)
    srv.process.kill()
    srv.process.wait()
    assert _wait_gone(children) == []


def test_serve_supervises_every_worker_and_hands_them_the_secret_privately(tiny_llama_dir, tmp_path):
    srv = start_serve(tiny_llama_dir, tmp_path, "--kv-secret", "s3cret", "--max-restarts", "0")
    cmdlines = {pid: open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
                for pid in child_pids(srv.process.pid)}
    roles = {pid: argv[argv.index(b"--role") + 1].decode() for pid, argv in cmdlines.items()
             if b"--role" in argv}
    assert sorted(roles.values()) == ["decode", "prefill"] and len(cmdlines) == 3
    for pid in roles:  # on no command line, in every worker's environment
        assert b"s3cret" not in b" ".join(cmdlines[pid])
        assert b"SPLITSERVE_KV_SECRET=s3cret" in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    # Both workers hold the same secret: a request's KV transfer authenticates.
    r = httpx.post(f"{srv.base_url}/v1/completions", timeout=60,
                   json={"prompt": "hello", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3

    decode = next(pid for pid, role in roles.items() if role == "decode")
    subprocess.run(["kill", "-KILL", str(decode)], check=True)
    assert srv.process.wait(30) == 1
    assert f"decode-0 (pid {decode}) was killed by SIGKILL; it exited 1 times" in srv.log()
    assert _wait_gone(list(cmdlines)) == []
