"""A worker's record of transfer incidents (what `splitserve doctor` shows per worker):
bounded, totals kept, and a prefill worker's lease expiry recorded with its request id.
(A decode worker's fallbacks: tests/test_doctor_deployment.py, between real workers.)"""

from __future__ import annotations

import socket
import time

import pytest

from splitserve.sampling_params import SamplingParams
from splitserve.transfer import KVTransferServer, TransferConfig, TransferStats
from splitserve.transfer import protocol as proto
from splitserve.worker.incidents import IncidentLog
from test_transfer_faults import BLOCK, FAST, setup


def test_record_is_bounded_and_counts_everything():
    log = IncidentLog(capacity=3)
    for i in range(5):
        log.record("fallback", f"r{i}", "peer_dead" if i % 2 else "stalled", "why", "p1")
    log.record("resume", "r9", "connection broke")
    snap = log.snapshot()
    assert [i["request_id"] for i in snap["recent"]] == ["r3", "r4", "r9"]   # oldest went
    assert snap["counts"] == {"fallback": 5, "fallback:stalled": 3, "fallback:peer_dead": 2,
                              "resume": 1, "resume:connection broke": 1}
    assert snap["recent"][0]["peer"] == "p1" and snap["recent"][0]["time"] <= time.time()
    with pytest.raises(ValueError):
        log.record("weather", "r", "rain")


def test_prefill_lease_expiry_is_recorded_with_its_request_id():
    pkv, _, fp, backend = setup()
    stats = TransferStats()
    incidents = IncidentLog()
    stats.on_incident = incidents.record
    with KVTransferServer(pkv, fp, TransferConfig(transport="tcp", **FAST), backend,
                          stats=stats) as server:
        with socket.create_connection(server.address) as sock:
            ch = proto.Channel(sock)
            ch.send(proto.Hello(proto.VERSION, b"n" * 16))
            assert isinstance(ch.recv()[0], proto.Challenge)
            ch.send(proto.Session(fp, ["tcp"], "x"))
            assert isinstance(ch.recv()[0], proto.HelloOk)
            ch.send(proto.Prefill("gone-d", list(range(4 * BLOCK)), SamplingParams(),
                                  4, 0))
        deadline = time.monotonic() + 10    # the lease is 1 s; the reaper ticks every 0.25 s
        while not incidents.snapshot()["recent"]:
            assert time.monotonic() < deadline, "lease never expired"
            time.sleep(0.05)
        [incident] = incidents.snapshot()["recent"]
        assert (incident["kind"], incident["request_id"]) == ("lease_expired", "gone-d")
        assert incident["reason"] == "decode disconnected"
        assert "decode verified" in incident["detail"]
        assert server.jobs() == [] and stats.blocks_pinned == 0
