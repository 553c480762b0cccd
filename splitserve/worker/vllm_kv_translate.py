"""vLLM's KV cache events in splitserve's terms: block hashes the router computes itself.

The kv router hashes a prompt's blocks with splitserve's chained xxh3
(kvtypes/block_hash.py) and looks those hashes up in the workers' events. vLLM names
blocks by its own hashes (sha256-based, salted by LoRA, multimodal inputs, cache_salt),
which no router can recompute from token ids. But vLLM's BlockStored carries the blocks'
token ids and the parent block's hash, so this keeps a mirror of the worker's prefix
cache, vLLM hash -> our hash, and re-hashes every stored block into our chain.

NOTE: our hash ignores vLLM's extra keys, so two vLLM blocks (e.g. the same tokens under
two cache salts) may have one hash of ours: it is announced when the first of them is
stored and withdrawn when the last is removed. vLLM also re-announces blocks reused from
its prefix cache; a hash already mirrored announces nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from splitserve.kvtypes.block_hash import ROOT_HASH, hash_block
from splitserve.kvtypes.events import AllCleared, BlockRemoved, BlockStored, KVEvent

logger = logging.getLogger(__name__)

# vLLM's medium for its own KV pool; other media are offloading tiers (CPU, storage) that
# a request cannot use without first loading them back, and which the router ignores.
_POOL_MEDIA = (None, "GPU")


class VllmKVTranslator:
    """Not thread-safe: one thread translates (the event listener's), and snapshot() is
    called under the same lock."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._ours: dict[Any, int] = {}     # vLLM block hash -> our chained hash
        self._refs: dict[int, int] = {}     # our hash -> how many vLLM hashes map to it

    def translate(self, events: list[Any]) -> list[KVEvent]:
        """vLLM events (vllm.distributed.kv_events types) -> ours, in order."""
        out: list[KVEvent] = []
        for event in events:
            kind = type(event).__name__
            if kind == "AllBlocksCleared":
                self.clear()
                out.append(AllCleared())
            elif not _in_pool(event):
                continue
            elif kind == "BlockStored":
                out += self._stored(event)
            elif kind == "BlockRemoved":
                removed = [h for h in map(self._forget, event.block_hashes) if h is not None]
                if removed:
                    out.append(BlockRemoved(removed))
        return out

    def clear(self) -> None:
        self._ours.clear()
        self._refs.clear()

    def snapshot(self) -> list[KVEvent]:
        """Events that rebuild the mirrored cache from nothing. Insertion order keeps every
        block after its parent."""
        hashes = list(self._refs)
        return [AllCleared(), *([BlockStored(hashes)] if hashes else [])]

    def _stored(self, event: Any) -> list[KVEvent]:
        hashes, tokens, size = event.block_hashes, event.token_ids, event.block_size
        if size != self.block_size or len(tokens) != len(hashes) * size:
            logger.warning("ignoring a vLLM BlockStored event with %d blocks of %d tokens and %d "
                           "token ids (this worker's block size is %d)", len(hashes), size,
                           len(tokens), self.block_size)
            return []
        if event.parent_block_hash is None:
            parent = ROOT_HASH
        elif (parent := self._ours.get(event.parent_block_hash)) is None:
            # Its parent was removed, or stored before this mirror began (lost events):
            # without the parent's tokens the chain cannot be continued.
            logger.debug("ignoring %d vLLM blocks whose parent block is unknown", len(hashes))
            return []
        out: list[KVEvent] = []
        run: list[int] = []             # new hashes in a row, announced as one event
        run_parent = None if event.parent_block_hash is None else parent
        for i, vllm_hash in enumerate(hashes):
            ours = hash_block(parent, tokens[i * size:(i + 1) * size])
            new = vllm_hash not in self._ours
            if new:
                self._ours[vllm_hash] = ours
                self._refs[ours] = self._refs.get(ours, 0) + 1
            if new and self._refs[ours] == 1:
                run.append(ours)
            else:
                # Already announced (a prefix-cache hit, or another vLLM hash naming the
                # same tokens): the run of new blocks breaks here.
                if run:
                    out.append(BlockStored(run, run_parent))
                    run = []
                run_parent = ours
            parent = ours
        if run:
            out.append(BlockStored(run, run_parent))
        return out

    def _forget(self, vllm_hash: Any) -> int | None:
        """Our hash to announce removed, or None (unknown, or still named by another)."""
        ours = self._ours.pop(vllm_hash, None)
        if ours is None:
            return None
        self._refs[ours] -= 1
        if self._refs[ours]:
            return None
        del self._refs[ours]
        return ours


def _in_pool(event: Any) -> bool:
    # Group 0 is the full-attention group of a Llama-family model; other groups
    # (sliding-window, mamba layers) do not decide prefix reuse in our router.
    return (getattr(event, "medium", None) in _POOL_MEDIA
            and getattr(event, "group_idx", None) in (None, 0))
