"""KV bytes at D equal P's, over both transports, with the bookkeeping the engine relies on."""

import threading

import pytest

from splitserve.transfer import (KVTransferServer, Outcome, PrefillRequest, TransferConfig,
                                 TransferStats, fetch_kv, kv_fingerprint)
from splitserve.sampling_params import SamplingParams
from splitserve.transfer.shmfile import allocate_shared_kv, free_shared_kv
from splitserve.transfer.synthetic import (SyntheticBackend, expected_first_token, make_kv,
                                           mismatched_blocks)

BLOCK = 16


def request(rid: str, num_blocks: int) -> PrefillRequest:
    return PrefillRequest(rid, list(range(num_blocks * BLOCK - 3)), SamplingParams(temperature=0.0),
                          num_blocks)


@pytest.mark.parametrize("transport,shared", [("tcp", False), ("shm", False), ("shm", True)])
def test_bytes_arrive_identical(transport, shared):
    dkv = make_kv(96)
    # shared: P's KV itself is in shared memory, D copies straight out of it
    pkv = allocate_shared_kv(tuple(dkv.shape), dkv.dtype) if shared else make_kv(96)
    fp = kv_fingerprint(pkv, architecture="LlamaForCausalLM")
    # 3 blocks per frame, so frames, chunks and runs of adjacent ids all have seams.
    cfg = TransferConfig(transport=transport, frame_bytes=3 * 8192 + 100, chunk_bytes=5000)
    backend = SyntheticBackend(pkv, blocks_per_chunk=4)
    p_stats, d_stats = TransferStats(), TransferStats()
    with KVTransferServer(pkv, fp, cfg, backend, stats=p_stats) as server:
        dest = [90, 3, 4, 5, 50, 51, 7] + list(range(20, 33))    # 20 blocks, scattered
        untouched = dkv.clone()
        r = fetch_kv(server.address, request("req-a", 20), dest, dkv, cfg, fp, stats=d_stats)
        assert r.outcome is Outcome.OK, r.reason
        assert r.transport == transport
        assert r.blocks_verified == 20 and r.first_token == expected_first_token("req-a")
        assert r.bytes == 20 * 8192 and r.resumes == 0 and r.checksum_failures == 0
        assert mismatched_blocks(dkv, "req-a", dest, 20) == []
        others = [b for b in range(96) if b not in dest]
        assert dkv[others].equal(untouched[others])
        _wait(lambda: backend.released == ["req-a"])
        assert server.jobs() == []
    assert p_stats.blocks_pinned == 0
    assert d_stats.snapshot()["transfers"] == {"ok": 1}
    assert p_stats.bytes_sent == 20 * 8192
    if shared:
        free_shared_kv(pkv)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_concurrent_requests(transport):
    pkv, dkv = make_kv(128), make_kv(128)
    fp = kv_fingerprint(pkv)
    cfg = TransferConfig(transport=transport, shm_ring_bytes=1 << 20)
    backend = SyntheticBackend(pkv, blocks_per_chunk=2, chunk_delay=0.005)
    results = {}
    with KVTransferServer(pkv, fp, cfg, backend) as server:
        def one(i):
            dest = list(range(i * 16, i * 16 + 15))
            results[i] = (dest, fetch_kv(server.address, request(f"c{i}", 15), dest, dkv, cfg, fp))
        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (dest, r) in results.items():
            assert r.ok, r.reason
            assert mismatched_blocks(dkv, f"c{i}", dest, 15) == []
        _wait(lambda: len(backend.released) == 6)


def test_single_block_request():
    pkv, dkv = make_kv(4), make_kv(4)
    fp = kv_fingerprint(pkv)
    cfg = TransferConfig(transport="tcp")
    with KVTransferServer(pkv, fp, cfg, SyntheticBackend(pkv)) as server:
        req = PrefillRequest("one", [7], SamplingParams(), 1)
        r = fetch_kv(server.address, req, [2], dkv, cfg, fp)
        assert r.ok and mismatched_blocks(dkv, "one", [2], 1) == []


def test_wrong_block_count_is_refused():
    pkv, dkv = make_kv(8), make_kv(8)
    fp = kv_fingerprint(pkv)
    cfg = TransferConfig(transport="tcp")
    with KVTransferServer(pkv, fp, cfg, SyntheticBackend(pkv)) as server:
        req = PrefillRequest("short", list(range(3 * BLOCK)), SamplingParams(), 2)   # needs 3 blocks
        r = fetch_kv(server.address, req, [0, 1], dkv, cfg, fp)
        assert r.outcome is Outcome.REFUSED and "need 3 blocks" in r.reason
        assert r.blocks_verified == 0 and server.jobs() == []


def _wait(cond, timeout=5.0):
    import time
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)
