"""KV memory of vLLM's shape in the transfer library (no vLLM needed): one tensor per
layer, the block dim anywhere, K and V as one or two planes; a block is an ordered list
of byte ranges, and the payload order never depends on which physical ids hold it."""

import threading

import pytest
import torch

from splitserve.transfer import (BlocksReady, Done, KVTransferServer, PrefillBackend,
                                 PrefillRequest, TransferConfig, fetch_kv, kv_fingerprint)
from splitserve.transfer.kvmem import KVBlocks, describe_mismatch

NUM_BLOCKS, BLOCK, HEADS, DIM, LAYERS = 24, 16, 2, 8, 3


def cpu_layers(seed: int = 0, num_blocks: int = NUM_BLOCKS) -> dict[str, torch.Tensor]:
    """vLLM CPU: [num_blocks, kv_heads, block_size, 2 * head_dim] per layer."""
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.self_attn.attn":
            torch.randn(num_blocks, HEADS, BLOCK, 2 * DIM, generator=g) for i in range(LAYERS)}


def flash_layers(seed: int = 0, num_blocks: int = NUM_BLOCKS) -> dict[str, torch.Tensor]:
    """vLLM CUDA flash-attn shape: [2, num_blocks, block_size, kv_heads, head_dim]."""
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.self_attn.attn":
            torch.randn(2, num_blocks, BLOCK, HEADS, DIM, generator=g) for i in range(LAYERS)}


def block_of(layers: dict[str, torch.Tensor], b: int, dim: int) -> list[torch.Tensor]:
    return [t.select(dim, b).clone() for t in layers.values()]


def test_planes_follow_the_block_dim():
    cpu = KVBlocks.from_layers(cpu_layers(), NUM_BLOCKS, BLOCK)
    assert len(cpu.planes) == LAYERS            # K and V interleaved inside a block
    flash = KVBlocks.from_layers(flash_layers(), NUM_BLOCKS, BLOCK)
    assert len(flash.planes) == 2 * LAYERS      # K plane and V plane per layer
    assert cpu.block_nbytes == flash.block_nbytes == LAYERS * 2 * BLOCK * HEADS * DIM * 4
    # adjacent ids merge into one view per plane; a gap splits them
    assert len(cpu.views([3, 4, 5])) == LAYERS
    assert len(cpu.views([3, 5])) == 2 * LAYERS
    assert cpu.max_blocks_per_frame() * LAYERS < 1024


def test_fingerprint_covers_layout_dtype_and_block_size():
    a = kv_fingerprint(KVBlocks.from_layers(cpu_layers(), NUM_BLOCKS, BLOCK), tp_rank=0)
    assert a == kv_fingerprint(KVBlocks.from_layers(cpu_layers(1), NUM_BLOCKS, BLOCK), tp_rank=0)
    assert a != kv_fingerprint(KVBlocks.from_layers(flash_layers(), NUM_BLOCKS, BLOCK), tp_rank=0)
    assert a != kv_fingerprint(KVBlocks.from_layers(cpu_layers(), NUM_BLOCKS, BLOCK), tp_rank=1)
    half = {k: v.half() for k, v in cpu_layers().items()}
    assert a != kv_fingerprint(KVBlocks.from_layers(half, NUM_BLOCKS, BLOCK), tp_rank=0)
    assert a["kv_block_size"] == str(BLOCK)


def test_pools_of_different_sizes_agree_on_what_a_block_means():
    """vLLM sizes each KV pool from its own free memory: P's and D's differ."""
    for layers in (cpu_layers, flash_layers):
        a = kv_fingerprint(KVBlocks.from_layers(layers(), NUM_BLOCKS, BLOCK), tp_rank=0)
        b = kv_fingerprint(KVBlocks.from_layers(layers(num_blocks=NUM_BLOCKS + 7),
                                                NUM_BLOCKS + 7, BLOCK), tp_rank=0)
        assert a == b, describe_mismatch(a, b)


def test_refuses_a_layer_whose_block_is_not_one_range():
    t = torch.zeros(HEADS, NUM_BLOCKS, BLOCK, DIM).transpose(0, 1)   # heads outside the block
    with pytest.raises(ValueError, match="not one byte range"):
        KVBlocks.from_layers({"l0": t}, NUM_BLOCKS, BLOCK)
    with pytest.raises(ValueError, match="no block dim"):
        KVBlocks.from_layers({"l0": torch.zeros(5, 4)}, NUM_BLOCKS, BLOCK)


class LayersBackend(PrefillBackend):
    """P: the prompt's blocks already sit at fixed physical ids (as in vLLM's KV)."""

    def __init__(self, ids: list[int]):
        self.ids = ids
        self.released = threading.Event()

    def start(self, request: PrefillRequest):
        for first in range(0, request.num_blocks, 2):
            yield BlocksReady(first, self.ids[first:first + 2])
        yield Done(0)

    def release(self, request_id: str) -> None:
        self.released.set()


@pytest.mark.parametrize("make", [cpu_layers, flash_layers], ids=["cpu_layout", "flash_layout"])
@pytest.mark.parametrize("transport", ["tcp", "shm"])
@pytest.mark.parametrize("have", [0, 2])
def test_blocks_land_at_other_physical_ids(make, transport, have):
    n = 7
    p_ids = [5, 6, 7, 11, 2, 3, 20]          # runs and gaps
    d_ids = [0, 9, 10, 11, 12, 1, 23]
    p_layers, d_layers = make(1), make(2)
    d_before = {k: v.clone() for k, v in d_layers.items()}
    dim = 0 if make is cpu_layers else 1
    p_kv = KVBlocks.from_layers(p_layers, NUM_BLOCKS, BLOCK)
    d_kv = KVBlocks.from_layers(d_layers, NUM_BLOCKS, BLOCK)
    fp = kv_fingerprint(p_kv, model="m")
    cfg = TransferConfig(transport=transport, frame_bytes=3 * p_kv.block_nbytes)
    backend = LayersBackend(p_ids)
    with KVTransferServer(p_kv, fp, cfg, backend, partial_start=True) as server:
        req = PrefillRequest("r1", list(range(n * BLOCK - 3)), num_blocks=n)
        res = fetch_kv(server.address, req, d_ids, d_kv, cfg, kv_fingerprint(d_kv, model="m"),
                       have_blocks=have)
    assert res.ok, res.reason
    assert res.transport == transport
    assert res.bytes == (n - have) * p_kv.block_nbytes
    for i, (pb, db) in enumerate(zip(p_ids, d_ids)):
        want = block_of(d_before if i < have else p_layers, db if i < have else pb, dim)
        for got, exp in zip(block_of(d_layers, db, dim), want):
            assert torch.equal(got, exp), f"logical block {i}"
    untouched = set(range(NUM_BLOCKS)) - set(d_ids)
    for b in untouched:
        for got, exp in zip(block_of(d_layers, b, dim), block_of(d_before, b, dim)):
            assert torch.equal(got, exp)
    assert backend.released.wait(5)
