"""How a vLLM prefill or decode worker configures SplitserveConnector from the worker's own
flags, and how the connector's counters reach the worker's /metrics. Nothing starts vLLM."""

from __future__ import annotations

import socket

import pytest

from splitserve.config import ConfigError
from splitserve.transfer.config import TransferConfig, TransferStats
from splitserve.worker.incidents import IncidentLog
from splitserve.worker.vllm_kv_transfer import ConnectorReports, ConnectorSettings, pick_kv_ports


def test_a_prefill_worker_is_vllms_kv_producer_serving_on_its_kv_port():
    settings = ConnectorSettings("prefill", kv_host="0.0.0.0", kv_port=7611,
                                 transfer=TransferConfig(lease=12.0, stall_timeout=11.0,
                                                         transport="tcp", secret="s3cret"))
    config = settings.kv_transfer_config()
    assert config["kv_connector"] == "SplitserveConnector"
    assert config["kv_connector_module_path"] == "splitserve.vllm_connector"
    assert config["kv_role"] == "kv_producer"
    extra = config["kv_connector_extra_config"]
    assert (extra["kv_port"], extra["kv_host"]) == (7611, "0.0.0.0")
    assert (extra["lease"], extra["stall_timeout"], extra["transport"]) == (12.0, 11.0, "tcp")
    # vLLM logs its config: the secret reaches the connector through the environment only.
    assert "secret" not in extra and "s3cret" not in repr(config)


@pytest.mark.parametrize("fallback, policy", [("local", "recompute"), ("fail", "fail")])
def test_kv_fallback_is_vllms_kv_load_failure_policy(fallback, policy):
    config = ConnectorSettings("decode", kv_fallback=fallback).kv_transfer_config()
    assert config["kv_role"] == "kv_consumer"
    assert config["kv_load_failure_policy"] == policy
    assert "kv_port" not in config["kv_connector_extra_config"]


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="needs a KV port"):
        ConnectorSettings("prefill")
    with pytest.raises(ConfigError, match="prefill or decode"):
        ConnectorSettings("both")


def test_connector_reports_add_up_in_the_workers_transfer_stats():
    stats = TransferStats()
    incidents = IncidentLog()
    stats.on_incident = incidents.record
    seconds: list[float] = []
    reports = ConnectorReports(stats, seconds.append)
    report = {"transfers": {"ok": 2}, "fallbacks": {}, "bytes_received": 1000, "bytes_sent": 0,
              "resumes": 1, "checksum_failures": 0, "lease_expired": 0, "prefills_cancelled": 0,
              "auth_failures": 0, "blocks_pinned": 3, "seconds_sum": 0.5,
              "fetches": [{"transfer_id": "r1.a", "outcome": "ok", "tokens": 64, "seconds": 0.2},
                          {"transfer_id": "r1.a", "outcome": "ok", "tokens": 64, "seconds": 0.3}],
              "incidents": [["resume", "r1.a", "connection broke", "1 resume(s)", "h:1"]]}
    reports.add(report)
    # TP 2: rank 0 got 96 tokens' blocks before P died, rank 1 only 32: the request has 32.
    reports.add({**report, "transfers": {"peer_dead": 1}, "fallbacks": {"peer_dead": 1},
                 "blocks_pinned": -3,
                 "fetches": [{"transfer_id": "r2.b", "outcome": "peer_dead", "tokens": 96,
                              "seconds": 1.0},
                             {"transfer_id": "r2.b", "outcome": "peer_dead", "tokens": 32,
                              "seconds": 1.5}],
                 "incidents": [["fallback", "r2.b", "peer_dead", "refused; policy local", ""]]})
    s = stats.snapshot()
    assert s["transfers"] == {"ok": 2, "peer_dead": 1} and s["fallbacks"] == {"peer_dead": 1}
    assert (s["bytes_received"], s["resumes"], s["blocks_pinned"]) == (2000, 2, 0)
    assert seconds == [0.2, 0.3, 1.0, 1.5]
    assert reports.transferred_tokens("r1.a") == 64 and reports.transferred_tokens("r2.b") == 32
    assert reports.transferred_tokens("r2.b") == 0          # read once
    recent = incidents.snapshot()["recent"]
    assert [(i["kind"], i["request_id"], i["reason"]) for i in recent] == [
        ("resume", "r1.a", "connection broke"), ("fallback", "r2.b", "peer_dead")]


def test_kv_ports_are_free_and_consecutive_one_per_tp_rank():
    base = pick_kv_ports("127.0.0.1", 2)
    for port in (base, base + 1):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    assert pick_kv_ports("127.0.0.1", 2, first=7600) == 7600     # --kv-port as given


def test_serves_vllm_workers_each_get_their_own_cores(monkeypatch):
    from splitserve.worker.vllm_options import cpu_core_slices

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    assert cpu_core_slices(2, 1, {}) == [{"VLLM_CPU_OMP_THREADS_BIND": "0,1"},
                                         {"VLLM_CPU_OMP_THREADS_BIND": "2,3"}]
    assert cpu_core_slices(2, 2, {}) == [{"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
                                         {"VLLM_CPU_OMP_THREADS_BIND": "2|3"}]
    # The user's binding wins; too few cores for a slice each: left as vLLM would.
    assert cpu_core_slices(2, 1, {"VLLM_CPU_OMP_THREADS_BIND": "0-3"}) == [{}, {}]
    assert cpu_core_slices(5, 1, {}) == [{}] * 5
