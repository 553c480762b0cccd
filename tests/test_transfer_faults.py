"""Every row of DESIGN.md's failure table that the data plane owns, each with a test."""

import logging
import socket
import threading
import time

import pytest

from fault_proxy import FaultProxy
from splitserve.transfer import (KVTransferServer, Outcome, PrefillRequest, TransferConfig,
                                 TransferStats, fetch_kv, kv_fingerprint)
from splitserve.transfer import protocol as proto
from splitserve.transfer.synthetic import SyntheticBackend, make_kv, mismatched_blocks

BLOCK, NB = 16, 8192
FAST = dict(stall_timeout=0.5, lease=1.0, heartbeat_interval=0.1, reconnect_backoff=0.01)


def request(rid: str, num_blocks: int) -> PrefillRequest:
    return PrefillRequest(rid, list(range(num_blocks * BLOCK)), {}, num_blocks)


def setup(num_blocks=80, **backend_kw):
    pkv, dkv = make_kv(num_blocks), make_kv(num_blocks)
    return pkv, dkv, kv_fingerprint(pkv), SyntheticBackend(pkv, **backend_kw)


def test_resets_resume_without_recompute():
    pkv, dkv, fp, backend = setup()
    cfg = TransferConfig(transport="tcp", frame_bytes=2 * NB, **FAST)
    with KVTransferServer(pkv, fp, cfg, backend) as server, FaultProxy(server.address) as proxy:
        proxy.reset_after(100_000, times=4)       # 64 blocks = 512 KiB: 4 resets per transfer
        dest = list(range(79, 15, -1))
        r = fetch_kv(proxy.address, request("resets", 64), dest, dkv, cfg, fp)
        assert r.outcome is Outcome.OK, r.reason
        assert proxy.resets == 4 and r.resumes == 4
        assert mismatched_blocks(dkv, "resets", dest, 64) == []
        assert backend.started == ["resets"]      # one prefill, resumed, never recomputed


def test_flipped_byte_is_nacked_and_resent():
    pkv, dkv, fp, backend = setup()
    cfg = TransferConfig(transport="tcp", frame_bytes=NB, **FAST)
    stats = TransferStats()
    with KVTransferServer(pkv, fp, cfg, backend) as server, FaultProxy(server.address) as proxy:
        proxy.flip_byte(20 * (NB + 80) + NB // 2)   # mid-payload of about the 20th frame
        dest = list(range(40))
        r = fetch_kv(proxy.address, request("flip", 40), dest, dkv, cfg, fp, stats=stats)
        assert r.outcome is Outcome.OK, r.reason
        assert proxy.flips == 1 and r.checksum_failures == 1 and r.resumes == 0
        assert r.bytes == 41 * NB                    # exactly one block re-sent
        assert mismatched_blocks(dkv, "flip", dest, 40) == []
    assert stats.checksum_failures == 1


def test_prefill_dies_mid_transfer_keeps_verified_prefix():
    pkv, dkv, fp, backend = setup(blocks_per_chunk=1, chunk_delay=0.02)
    cfg = TransferConfig(transport="tcp", reconnect_attempts=2, **FAST)
    srv = KVTransferServer(pkv, fp, cfg, backend)
    srv.start()
    threading.Timer(0.3, srv.close).start()          # P goes away ~15 blocks in
    dest = list(range(60))
    r = fetch_kv(srv.address, request("dies", 60), dest, dkv, cfg, fp)
    assert r.outcome is Outcome.PEER_DEAD, r.reason
    assert 0 < r.blocks_verified < 60 and r.first_token is None
    assert mismatched_blocks(dkv, "dies", dest, r.blocks_verified) == []


def test_stalled_prefill_is_declared_dead():
    pkv, dkv, fp, backend = setup(blocks_per_chunk=1, stall_at_block=5)
    cfg = TransferConfig(transport="tcp", **FAST)
    with KVTransferServer(pkv, fp, cfg, backend) as server:
        t0 = time.monotonic()
        r = fetch_kv(server.address, request("stall", 20), list(range(20)), dkv, cfg, fp)
        assert r.outcome is Outcome.STALLED, r.reason
        assert 0.5 <= time.monotonic() - t0 < 2.0
        assert r.blocks_verified == 5
        assert mismatched_blocks(dkv, "stall", list(range(20)), 5) == []


@pytest.mark.parametrize("progress_interval,outcome", [(0.1, Outcome.OK), (None, Outcome.STALLED)])
def test_progress_keeps_slow_prefill_alive(progress_interval, outcome):
    # Each chunk computes for longer than the stall timeout; only PROGRESS frames during
    # the chunk tell D that P is slow rather than dead.
    pkv, dkv, fp, backend = setup(blocks_per_chunk=2, chunk_delay=0.4,
                                  progress_interval=progress_interval)
    cfg = TransferConfig(transport="tcp", **{**FAST, "stall_timeout": 0.3})
    with KVTransferServer(pkv, fp, cfg, backend) as server:
        r = fetch_kv(server.address, request("slow", 6), list(range(6)), dkv, cfg, fp)
        assert r.outcome is outcome, r.reason


def test_frozen_link_is_declared_dead():
    pkv, dkv, fp, backend = setup(blocks_per_chunk=1, chunk_delay=0.02)
    cfg = TransferConfig(transport="tcp", **FAST)
    with KVTransferServer(pkv, fp, cfg, backend) as server, FaultProxy(server.address) as proxy:
        # Like SIGSTOP on P mid-transfer: the connection stays up, nothing moves.
        threading.Timer(0.2, proxy.stall, args=(True,)).start()
        t0 = time.monotonic()
        r = fetch_kv(proxy.address, request("frozen", 60), list(range(60)), dkv, cfg, fp)
        assert r.outcome is Outcome.STALLED, r.reason
        assert 0.6 < time.monotonic() - t0 < 1.5
        assert 0 < r.blocks_verified < 60
        proxy.stall(False)


@pytest.mark.parametrize("silent", ["disconnected", "connected"])
def test_silent_decode_loses_its_lease(caplog, silent):
    pkv, _, fp, backend = setup()
    cfg = TransferConfig(transport="tcp", **FAST)
    stats = TransferStats()
    caplog.set_level(logging.INFO, logger="splitserve.transfer")
    with KVTransferServer(pkv, fp, cfg, backend, stats=stats) as server:
        sock = socket.create_connection(server.address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        ch = proto.Channel(sock)
        ch.send(proto.Hello(proto.VERSION, fp, b"n" * 16, ["tcp"], "x"))
        assert isinstance(ch.recv()[0], proto.HelloOk)
        ch.send(proto.Prefill("lost-d", list(range(70 * BLOCK)), {}, 70, 0))
        if silent == "disconnected":
            time.sleep(0.1)
            sock.close()
        # The reaper releases the blocks first and logs (and counts) after: wait for the
        # WARNING itself, which comes last.
        deadline = time.monotonic() + 5
        while not (warnings := [r for r in caplog.records if r.levelno == logging.WARNING]):
            assert time.monotonic() < deadline, "lease never expired"
            time.sleep(0.05)
        sock.close()
        assert backend.released == ["lost-d"]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        msg = warnings[0].getMessage()
        assert "lost-d" in msg and "lease expired" in msg and "bytes sent" in msg
        assert f"decode {silent}" in msg
        assert server.jobs() == [] and stats.lease_expired == 1 and stats.blocks_pinned == 0


def test_prefill_failure_is_reported():
    pkv, dkv, fp, backend = setup(blocks_per_chunk=1, fail_at_block=3)
    cfg = TransferConfig(transport="tcp", **FAST)
    with KVTransferServer(pkv, fp, cfg, backend) as server:
        r = fetch_kv(server.address, request("boom", 8), list(range(8)), dkv, cfg, fp)
        assert r.outcome is Outcome.PEER_ERROR and "synthetic prefill failure" in r.reason
        assert r.blocks_verified == 3
        deadline = time.monotonic() + 5
        while backend.released != ["boom"]:     # P releases right after sending ERROR
            assert time.monotonic() < deadline
            time.sleep(0.01)


def test_unreachable_prefill_is_dead():
    _, dkv, fp, _ = setup()
    with socket.create_server(("127.0.0.1", 0)) as s:
        addr = s.getsockname()[:2]          # bound then closed: nobody listens there
    cfg = TransferConfig(transport="tcp", reconnect_attempts=1, **FAST)
    r = fetch_kv(addr, request("nobody", 2), [0, 1], dkv, cfg, fp)
    assert r.outcome is Outcome.PEER_DEAD and r.blocks_verified == 0
