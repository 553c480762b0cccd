"""KVIndex: leading-prefix overlap over the engine's chained block hashes, events applied
and undone, lost or repeated batches detected, predictions that expire."""

import msgspec
import pytest

from splitserve.kvtypes.block_hash import ROOT_HASH, hash_block
from splitserve.router import (
    AllCleared, BlockRemoved, BlockStored, KVEventBatch, KVIndex, decode_batch, encode_batch)

BS = 4


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Feed:
    """A worker's event stream: consecutive seqs within one epoch."""

    def __init__(self, index: KVIndex, worker_id: str, epoch: int = 1) -> None:
        self.index, self.worker_id, self.epoch, self.seq = index, worker_id, epoch, -1

    def send(self, *events):
        self.seq += 1
        return self.index.apply(KVEventBatch(self.worker_id, self.epoch, self.seq, list(events)))


def tokens(prefix_id: int, n: int) -> list[int]:
    return [prefix_id * 1000 + i for i in range(n)]


def test_hashes_are_the_engines_chained_hashes_of_full_blocks():
    index = KVIndex(BS)
    ids = tokens(1, 10)                       # two full blocks and a partial one
    h = index.block_hashes(ids)
    assert h == [hash_block(ROOT_HASH, ids[0:4]), hash_block(h[0], ids[4:8])]
    # Chained: equal second blocks after different first blocks hash differently.
    other = [9, 9, 9, 9] + ids[4:8]
    assert index.block_hashes(other)[1] != h[1]


def test_overlap_counts_leading_cached_blocks_per_worker():
    index = KVIndex(BS)
    shared = tokens(1, 12)
    prompt_a = shared + tokens(2, 8)          # 5 blocks, first 3 shared
    prompt_b = shared + tokens(3, 8)
    Feed(index, "A").send(BlockStored(index.block_hashes(prompt_a)))
    Feed(index, "B").send(BlockStored(index.block_hashes(prompt_b)[:2]))
    query = index.block_hashes(prompt_b)
    assert index.overlap(["A", "B", "C"], query) == {"A": 3, "B": 2, "C": 0}
    assert index.overlap(["A"], index.block_hashes(prompt_a)) == {"A": 5}
    assert index.num_blocks("A") == 5


def test_blocks_cached_without_their_prefix_do_not_count():
    index = KVIndex(BS)
    h = index.block_hashes(tokens(1, 20))
    Feed(index, "A").send(BlockStored(h[1:], parent_hash=h[0]))
    assert index.overlap(["A"], h) == {"A": 0}


def test_removed_blocks_cut_the_prefix_and_clear_empties_a_worker():
    index = KVIndex(BS)
    h = index.block_hashes(tokens(1, 20))
    feed = Feed(index, "A")
    feed.send(BlockStored(h))
    feed.send(BlockRemoved([h[2]]))
    assert index.overlap(["A"], h) == {"A": 2}
    feed.send(BlockStored([h[2]], parent_hash=h[1]))
    assert index.overlap(["A"], h) == {"A": 5}
    feed.send(AllCleared())
    assert index.overlap(["A"], h) == {"A": 0}
    feed.send(BlockStored(h[:1]))
    index.remove_worker("A")
    assert index.overlap(["A"], h) == {"A": 0} and index.num_blocks("A") == 0


def test_duplicate_batches_are_ignored_and_gaps_or_restarts_resync():
    index = KVIndex(BS)
    h = index.block_hashes(tokens(1, 20))
    feed = Feed(index, "A")
    assert feed.send(BlockStored(h[:2])) == "applied"
    # A redelivered batch (same seq) must not re-add blocks removed since.
    feed.send(BlockRemoved(h[:2]))
    assert index.apply(KVEventBatch("A", 1, 0, [BlockStored(h[:2])])) == "duplicate"
    assert index.overlap(["A"], h) == {"A": 0}
    # Lost batches: whatever they said is unknown, so the old picture is dropped.
    feed.send(BlockStored(h[:3]))
    feed.seq += 2
    assert feed.send(BlockStored(h[3:4], parent_hash=h[2])) == "resync"
    assert index.num_blocks("A") == 1 and index.overlap(["A"], h) == {"A": 0}
    # A restart (new epoch) starts from an empty cache.
    restarted = Feed(index, "A", epoch=2)
    assert restarted.send(BlockStored(h[:1])) == "resync"
    assert index.num_blocks("A") == 1
    # A router that joins late has missed the worker's earlier batches.
    assert index.apply(KVEventBatch("B", 7, 5, [BlockStored(h)])) == "resync"


def test_predictions_count_until_confirmed_removed_or_expired():
    clock = Clock()
    index = KVIndex(BS, prediction_ttl_s=10, clock=clock)
    h = index.block_hashes(tokens(1, 20))
    index.predict("A", h)
    assert index.overlap(["A", "B"], h) == {"A": 5, "B": 0}
    assert index.num_blocks("A") == 0          # predictions are not reported blocks
    feed = Feed(index, "A")
    feed.send(BlockStored(h[:2]))
    feed.send(BlockRemoved([h[3]]))             # the worker says it does not hold h[3]
    assert index.overlap(["A"], h) == {"A": 3}
    clock.now += 10
    assert index.overlap(["A"], h) == {"A": 2}  # only what the worker confirmed remains


def test_event_batches_round_trip_through_json_with_64_bit_hashes():
    big = 2**64 - 1
    batch = KVEventBatch("p0", 1722000000000000000, 3,
                         [BlockStored([big, 1], parent_hash=7), BlockRemoved([big]), AllCleared()])
    assert decode_batch(encode_batch(batch)) == batch
    with pytest.raises(msgspec.ValidationError):
        decode_batch(b'{"worker_id":"p0","epoch":1,"seq":0,"events":[{"type":"evicted"}]}')
