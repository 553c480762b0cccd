"""GET /kv_events on a real worker: a snapshot, then live batches with contiguous seqs, to
several subscribers at once, naming a prompt's blocks by the hashes routers compute; and
a subscriber that falls behind is dropped instead of holding anyone up."""

import asyncio
import queue
import signal
import threading
import time

import httpx
import pytest

from splitserve.router import AllCleared, BlockStored, KVIndex, decode_batch
from splitserve.worker.kv_events import KVEventPublisher
from workers import generate, start_worker


class Subscription:
    """Reads one /kv_events stream on a thread; batches arrive on .batches."""

    def __init__(self, url: str):
        self.batches: queue.Queue = queue.Queue()
        self._client = httpx.Client(timeout=httpx.Timeout(10, read=None))
        self._thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self._thread.start()

    def _read(self, url: str) -> None:
        try:
            with self._client.stream("GET", f"{url}/kv_events") as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    if line:
                        self.batches.put(decode_batch(line))
        except httpx.HTTPError:
            pass            # closed by the test
        finally:
            self._client.close()

    def next(self):
        return self.batches.get(timeout=15)

    def until_stored(self, hashes: set[int]) -> list:
        got, seen = [], set()
        while not hashes <= seen:
            batch = self.next()
            got.append(batch)
            seen.update(h for e in batch.events if isinstance(e, BlockStored) for h in e.block_hashes)
        return got

    def wait_closed(self) -> None:
        self._thread.join(5)
        assert not self._thread.is_alive(), "the stream did not end"

    def close(self) -> None:
        self._client.close()


@pytest.fixture(scope="module")
def worker(tiny_llama_dir, tmp_path_factory):
    w = start_worker("both", tiny_llama_dir, tmp_path_factory.mktemp("events"), "--worker-id", "w-events")
    yield w
    w.stop()


def test_snapshot_then_live_batches_to_two_subscribers(worker):
    index = KVIndex(worker.info.block_size)
    first = list(range(1, 50))
    sub_a = Subscription(worker.url)
    snap_a = sub_a.next()
    assert (snap_a.worker_id, snap_a.events[0]) == ("w-events", AllCleared())
    assert generate(worker, "kv-1", first, 2, None)[0] == 200
    live_a = sub_a.until_stored(set(index.block_hashes(first)))

    # A second subscriber joins later: its snapshot already holds the first prompt's
    # blocks, in chain order from the start of the sequence.
    sub_b = Subscription(worker.url)
    snap_b = sub_b.next()
    assert snap_b.epoch == snap_a.epoch and snap_b.seq == live_a[-1].seq
    hashes = [h for e in snap_b.events[1:] for h in e.block_hashes]
    assert hashes[:len(index.block_hashes(first))] == index.block_hashes(first)
    assert snap_b.events[1].parent_hash is None

    second = first[:16] + list(range(200, 240))
    assert generate(worker, "kv-2", second, 2, None)[0] == 200
    new = set(index.block_hashes(second)) - set(index.block_hashes(first))
    for sub, start in ((sub_a, live_a[-1].seq), (sub_b, snap_b.seq)):
        batches = sub.until_stored(new)
        assert [b.seq for b in batches] == list(range(start + 1, start + 1 + len(batches)))
    # Both subscribers mirror the same cache: a KVIndex fed either sees the prompt cached.
    for batches in ((snap_a, *live_a), (snap_b,)):
        idx = KVIndex(worker.info.block_size)
        for b in batches:
            idx.apply(b)
        assert idx.overlap(["w-events"], index.block_hashes(first)) == {"w-events": len(index.block_hashes(first))}
    sub_b.close()

    # Shutdown ends the open streams at once instead of waiting out the graceful timeout.
    started = time.monotonic()
    worker.stop(signal.SIGTERM)
    assert time.monotonic() - started < 4
    assert "graceful shutdown exceeded" not in worker.log()
    sub_a.wait_closed()


class _FakeEngine:
    """The one WorkerEngine call the publisher makes, run inline: an empty prefix cache,
    nothing pending."""

    async def kv_snapshot(self, take):
        return take([AllCleared()])


def test_a_subscriber_that_falls_behind_is_dropped_and_others_keep_going():
    async def scenario():
        publisher = KVEventPublisher("w", max_queued=4)
        publisher.start()
        engine = _FakeEngine()
        slow = await publisher.subscribe(engine)
        fast = await publisher.subscribe(engine)
        assert decode_batch(await anext(slow)).seq == 0
        assert decode_batch(await anext(fast)).seq == 0
        fast_seqs = []
        for i in range(10):
            publisher.publish([BlockStored([i])])
            await asyncio.sleep(0)             # the loop runs the fan-out
            fast_seqs.append(decode_batch(await anext(fast)).seq)
        assert fast_seqs == list(range(1, 11))
        # slow read nothing: its queue overflowed, and its stream ends.
        assert [line async for line in slow] == []
        publisher.close()
        assert [line async for line in fast] == []
    asyncio.run(scenario())
