"""Every row of DESIGN.md's failure table that the data plane owns, each with a test."""

import logging
import socket
import threading
import time

import pytest

from fault_proxy import FaultProxy
from splitserve.sampling_params import SamplingParams
from splitserve.transfer import (KVTransferServer, Outcome, PrefillRequest, TransferConfig,
                                 TransferStats, fetch_kv, kv_fingerprint)
from splitserve.transfer import protocol as proto
from splitserve.transfer.synthetic import SyntheticBackend, make_kv, mismatched_blocks

BLOCK, NB = 16, 8192
FAST = dict(stall_timeout=0.5, lease=1.0, heartbeat_interval=0.1, reconnect_backoff=0.01)


def request(rid: str, num_blocks: int) -> PrefillRequest:
    return PrefillRequest(rid, list(range(num_blocks * BLOCK)), SamplingParams(),
                          num_blocks)


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


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_hung_prefill_is_busy_not_dead_and_is_dropped():
    # P's engine hangs at block 5 while its process lives: PROGRESS heartbeats keep
    # coming, so this is not a stall. D gives up after the busy timeout, tells P (CANCEL),
    # and P drops the request instead of computing it for nobody.
    pkv, dkv, fp, backend = setup(blocks_per_chunk=1, stall_at_block=5)
    cfg = TransferConfig(transport="tcp", busy_timeout=1.0, **FAST)
    stats = TransferStats()
    with KVTransferServer(pkv, fp, cfg, backend, stats=stats) as server:
        r = fetch_kv(server.address, request("hung", 20), list(range(20)), dkv, cfg, fp)
        assert r.outcome is Outcome.BUSY, r.reason
        assert "no progress" in r.reason and "kv_busy_timeout 1.0s" in r.reason
        assert r.blocks_verified == 5
        assert mismatched_blocks(dkv, "hung", list(range(20)), 5) == []
        wait_until(lambda: backend.released == ["hung"] and server.jobs() == [])
        wait_until(lambda: stats.prefills_cancelled == 1 and stats.blocks_pinned == 0)
        assert stats.lease_expired == 0


def test_queued_request_hears_its_place_and_gives_up_cleanly():
    # The first request occupies P (hung before any block); the second waits behind it.
    # D hears where it stands in P's queue; past the busy timeout it cancels, and P drops
    # it without ever computing it.
    pkv, dkv, fp, backend = setup(blocks_per_chunk=1, stall_at_block=0)
    cfg = TransferConfig(transport="tcp", busy_timeout=0.8, **FAST)
    patient = TransferConfig(transport="tcp", busy_timeout=3.0, **FAST)
    with KVTransferServer(pkv, fp, cfg, backend) as server:
        first = threading.Thread(target=fetch_kv, args=(server.address, request("first", 20),
                                                        list(range(20)), dkv, patient, fp))
        first.start()
        wait_until(lambda: server.jobs() == ["first"])
        r = fetch_kv(server.address, request("second", 10), list(range(20, 30)), dkv, cfg, fp)
        assert r.outcome is Outcome.BUSY, r.reason
        assert "queued at position 1 with 320 prompt tokens ahead" in r.reason
        first.join(10)
        wait_until(lambda: sorted(backend.released) == ["first", "second"])
        assert server.jobs() == []


@pytest.mark.parametrize("progress_interval", [0.1, None])
def test_slow_chunks_are_busy_not_dead(progress_interval):
    # Each chunk computes for longer than the stall timeout. Whether or not the engine
    # reports progress mid-chunk, P's own heartbeats say it is alive: no stall.
    pkv, dkv, fp, backend = setup(blocks_per_chunk=2, chunk_delay=0.4,
                                  progress_interval=progress_interval)
    cfg = TransferConfig(transport="tcp", **{**FAST, "stall_timeout": 0.3,
                                             "heartbeat_interval": 0.1})
    with KVTransferServer(pkv, fp, cfg, backend) as server:
        r = fetch_kv(server.address, request("slow", 6), list(range(6)), dkv, cfg, fp)
        assert r.outcome is Outcome.OK, r.reason


def test_a_long_chunk_with_frequent_progress_keeps_the_lease():
    # PROGRESS every 20 ms: D's receive never waits long enough to be idle, and no block
    # arrives to ACK for 3 s, three leases. D must still heartbeat, or P releases the
    # blocks it is computing (seen with vLLM: decode held all but the last block locally).
    pkv, dkv, fp, backend = setup(blocks_per_chunk=4, chunk_delay=3.0, progress_interval=0.02)
    cfg = TransferConfig(transport="tcp", **{**FAST, "stall_timeout": 2.0, "busy_timeout": 10.0})
    stats = TransferStats()
    with KVTransferServer(pkv, fp, cfg, backend, stats=stats) as server:
        r = fetch_kv(server.address, request("long-chunk", 4), list(range(4)), dkv, cfg, fp)
        assert r.outcome is Outcome.OK, r.reason
        assert mismatched_blocks(dkv, "long-chunk", list(range(4)), 4) == []
    assert stats.lease_expired == 0


def test_cancelled_fetch_returns_at_once_and_p_drops_it():
    from splitserve.transfer.client import FetchCancel
    pkv, dkv, fp, backend = setup(blocks_per_chunk=1, stall_at_block=3)
    cfg = TransferConfig(transport="tcp", **FAST)
    stats, cancel = TransferStats(), FetchCancel()
    with KVTransferServer(pkv, fp, cfg, backend) as server:
        threading.Timer(0.3, cancel.cancel, args=("the client left",)).start()
        t0 = time.monotonic()
        r = fetch_kv(server.address, request("gone", 20), list(range(20)), dkv, cfg, fp,
                     stats=stats, cancel=cancel)
        assert r.outcome is Outcome.CANCELLED and r.reason == "the client left"
        assert time.monotonic() - t0 < 5.0      # not the busy timeout (300 s)
        wait_until(lambda: backend.released == ["gone"] and server.jobs() == [])
    assert stats.transfers["cancelled"] == 1 and not stats.fallbacks


def test_reconnects_count_a_live_prefill_as_progress():
    # The link resets every session before any block is ready, while P computes one long
    # chunk. Only P's PROGRESS shows it is alive; with reconnect_attempts=1 that must be
    # enough to keep reconnecting until the KV arrives. The lease is long: a loaded machine
    # may delay D's reconnect past FAST's 1 s lease, and a lease expiry (tested elsewhere)
    # would restart the prefill and add a resume this test does not count.
    pkv, dkv, fp, backend = setup(blocks_per_chunk=20, chunk_delay=1.5, progress_interval=0.05)
    cfg = TransferConfig(transport="tcp", **{**FAST, "reconnect_attempts": 1, "lease": 30.0})
    with KVTransferServer(pkv, fp, cfg, backend) as server, FaultProxy(server.address) as proxy:
        proxy.reset_after(400, times=4)
        r = fetch_kv(proxy.address, request("flaky", 20), list(range(20)), dkv, cfg, fp)
        assert r.outcome is Outcome.OK, r.reason
        assert proxy.resets == 4 and r.resumes == 4
        assert backend.started == ["flaky"]
        assert mismatched_blocks(dkv, "flaky", list(range(20)), 20) == []


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
        ch.send(proto.Hello(proto.VERSION, b"n" * 16))
        assert isinstance(ch.recv()[0], proto.Challenge)
        ch.send(proto.Session(fp, ["tcp"], "x"))
        assert isinstance(ch.recv()[0], proto.HelloOk)
        ch.send(proto.Prefill("lost-d", list(range(70 * BLOCK)), SamplingParams(), 70, 0))
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
