"""Byte views of a paged KV cache: the only place the data plane touches tensor memory.

A KV cache is one or more *planes*; in each plane, physical block b is the byte range
[b * stride, b * stride + nbytes). Block b as a whole is its range in every plane, and a
frame's payload is always **plane-major**: for each plane in order, the blocks of the frame
in logical order. That order depends only on the planes and the logical blocks, never on
which physical ids hold them, so P and D agree on it even when their ids differ; a run of
adjacent physical ids is one view per plane, which the transports move with one copy /
one iovec each.

- Our engine: one contiguous tensor [num_blocks, num_layers, 2, block_size, kv_heads,
  head_dim] (`KVBlocks(kv)`): one plane, a block is one byte range across all layers.
- vLLM: one tensor per layer (`KVBlocks.from_layers`), the block dim anywhere (CPU:
  [num_blocks, kv_heads, block_size, 2 * head_dim], dim 0; CUDA flash-attn:
  [2, num_blocks, block_size, kv_heads, head_dim], dim 1, so K and V are two planes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

LAYOUT = "blocks,layers,kv,block_size,kv_heads,head_dim"
IOV_MAX = 1024   # Linux's sendmsg limit on buffers per call


@dataclass(frozen=True)
class Plane:
    mem: memoryview     # the plane's bytes, block 0 first
    stride: int         # bytes from one block to the next
    nbytes: int         # bytes of one block in this plane (<= stride)


class KVBlocks:
    def __init__(self, kv: torch.Tensor):
        """Our engine's layout: one contiguous tensor, block dim first."""
        if kv.dim() != 6:
            raise ValueError(f"kv must have 6 dims ({LAYOUT}), got shape {tuple(kv.shape)}")
        if not kv.is_contiguous():
            raise ValueError("kv must be contiguous so that a block is one byte range")
        _check_cpu(kv)
        nbytes = kv[0].numel() * kv.element_size()
        self._init([Plane(_bytes_of(kv), nbytes, nbytes)], kv.shape[0], kv.shape[3], (kv,))
        self.kv = kv
        self.layout = LAYOUT
        self.geometry = {"kv_block_shape": "x".join(str(d) for d in kv.shape[1:]),
                         "kv_dtype": _dtype(kv)}

    @classmethod
    def from_layers(cls, layers: Mapping[str, torch.Tensor], num_blocks: int,
                    block_size: int) -> "KVBlocks":
        """A foreign paged KV: one tensor per layer (dict order is plane order), each with
        exactly one dim of size `num_blocks` that indexes blocks, such that every slice
        along it is one contiguous byte range (checked, never assumed).

        NOTE: when a layer has two dims of size num_blocks, the first is taken: vLLM's
        layouts put at most [2, ...] before the block dim.
        """
        self = cls.__new__(cls)
        planes: list[Plane] = []
        shapes = set()
        seen: set[int] = set()
        for name, t in layers.items():
            _check_cpu(t)
            if t.data_ptr() in seen:     # layers sharing one cache (KV sharing) move once
                continue
            seen.add(t.data_ptr())
            if num_blocks not in t.shape:
                raise ValueError(f"KV layer {name}: shape {tuple(t.shape)} has no block dim "
                                 f"of size {num_blocks}")
            d = list(t.shape).index(num_blocks)
            inner = t.shape[d + 1:]
            esz = t.element_size()
            nbytes = torch.Size(inner).numel() * esz
            if not _dense(t, d + 1):
                raise ValueError(f"KV layer {name}: a block (dims after {d} of shape "
                                 f"{tuple(t.shape)}, strides {t.stride()}) is not one byte range")
            stride = t.stride(d) * esz
            if stride < nbytes:
                raise ValueError(f"KV layer {name}: blocks overlap (stride {stride} < {nbytes})")
            storage = _storage_bytes(t)
            size = (num_blocks - 1) * stride + nbytes
            for outer in _outer_indices(t.shape[:d]):
                base = t[outer].data_ptr() - t.untyped_storage().data_ptr()
                planes.append(Plane(storage[base:base + size], stride, nbytes))
            # What a block's bytes mean, not how many blocks the pool has (P's and D's
            # differ): the dims and strides inside a block, the planes outside it.
            shapes.add(f"{'x'.join(map(str, t.shape[:d]))}[N]{'x'.join(map(str, inner))}/"
                       f"{'x'.join(map(str, t.stride()[d + 1:]))}@{d}")
        if not planes:
            raise ValueError("no KV layers")
        self._init(planes, num_blocks, block_size, tuple(layers.values()))
        self.kv = None
        self.layout = "layers:" + ";".join(sorted(shapes))
        dtypes = sorted({_dtype(t) for t in layers.values()})
        self.geometry = {"kv_layers": str(len(seen)), "kv_planes": str(len(planes)),
                         "kv_layer_shapes": ";".join(sorted(shapes)), "kv_dtype": ",".join(dtypes)}
        return self

    def _init(self, planes: list[Plane], num_blocks: int, block_size: int, keep) -> None:
        self.planes = planes
        self._keep = keep     # the tensors: memory stays alive as long as the views exist
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.block_nbytes = sum(p.nbytes for p in planes)
        # One plane whose blocks abut: the engine's pool, one range for any run of blocks.
        self.mem = planes[0].mem if len(planes) == 1 and planes[0].stride == planes[0].nbytes else None

    def max_blocks_per_frame(self) -> int:
        """Worst case (no two ids adjacent) a frame of k blocks is planes * k views plus a
        header: keep it within one sendmsg."""
        return max(1, (IOV_MAX - 1) // len(self.planes))

    def check_ids(self, ids: Sequence[int], what: str) -> None:
        for b in ids:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"{what}: block id {b} outside 0..{self.num_blocks - 1}")

    def views(self, ids: Sequence[int]) -> list[memoryview]:
        """Views of blocks `ids` in payload order (plane-major), adjacent ids merged into
        one view per plane where the plane's blocks abut.

        Callers must have validated `ids` (check_ids); this runs per frame, so it does not
        re-check.
        """
        runs: list[tuple[int, int]] = []
        start = prev = ids[0]
        for b in ids[1:]:
            if b != prev + 1:
                runs.append((start, prev + 1))
                start = b
            prev = b
        runs.append((start, prev + 1))
        out: list[memoryview] = []
        for p in self.planes:
            s, n = p.stride, p.nbytes
            for a, z in runs:
                if s == n:
                    out.append(p.mem[a * s:z * s])
                else:
                    out.extend(p.mem[b * s:b * s + n] for b in range(a, z))
        return out


def _check_cpu(t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        # NOTE: CUDA KV needs a pinned staging buffer; not part of this transport yet.
        raise ValueError(f"kv must live in CPU memory for tcp/shm, got {t.device}")


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def _storage_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's whole storage as bytes (views of a layer may start anywhere in it)."""
    st = t.untyped_storage()
    whole = torch.empty(0, dtype=torch.uint8).set_(st, 0, (st.nbytes(),), (1,))
    return memoryview(whole.numpy())


def _dense(t: torch.Tensor, first_dim: int) -> bool:
    """Dims first_dim.. of t are laid out row-major without gaps."""
    expect = 1
    for d in range(t.dim() - 1, first_dim - 1, -1):
        if t.shape[d] != 1 and t.stride(d) != expect:
            return False
        expect *= t.shape[d]
    return True


def _outer_indices(shape: Sequence[int]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for n in shape:
        out = [o + (i,) for o in out for i in range(n)]
    return out


def kv_fingerprint(kv: torch.Tensor | KVBlocks, **model: object) -> dict[str, str]:
    """What P and D must agree on before a single byte of KV is interpreted.

    The KV geometry comes from the memory itself; the engine adds what it cannot show
    (architecture, model hash/revision, TP rank and size, rope settings, ...).
    """
    blocks = kv if isinstance(kv, KVBlocks) else KVBlocks(kv)
    fp = {"kv_layout": blocks.layout, **blocks.geometry}
    if blocks.kv is None:
        fp["kv_block_size"] = str(blocks.block_size)
    fp.update({k: str(v) for k, v in model.items()})
    return fp


def as_blocks(kv: torch.Tensor | KVBlocks) -> KVBlocks:
    return kv if isinstance(kv, KVBlocks) else KVBlocks(kv)


def describe_mismatch(ours: dict[str, str], theirs: dict[str, str]) -> str:
    keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    diff = ", ".join(f"{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in keys)
    return f"differs in {diff}"
