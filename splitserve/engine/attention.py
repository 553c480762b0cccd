"""Paged attention over the KV tensor, for one forward pass of a mixed batch.

The batch is flattened: sequence i owns query rows [q_start_i, q_start_i + n_i) and sits
at positions [start_i, start_i + n_i). Each layer first writes the new K/V into the
sequence's blocks, then attends. Single-token (decode) sequences are attended together by
the paged decode kernel, which reads their blocks in place (engine.paged_decode);
multi-token (prefill chunk) sequences one by one, with the causal mask aligned to the
bottom-right so a chunk sees its whole cached prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.nn.utils.rnn import pad_sequence

from splitserve.engine.paged_decode import decode_prepared, paged_decode_attention


@dataclass
class SeqSlice:
    q_start: int
    num_new: int
    start: int                  # position of the first new token
    block_ids: torch.Tensor     # [num_blocks_needed] long, covering start + num_new tokens


class PagedAttention:
    """Callable matching the model's AttentionFn for one forward pass."""

    def __init__(self, kv: torch.Tensor, block_size: int, seqs: list[SeqSlice],
                 slot_blocks: torch.Tensor, slot_offsets: torch.Tensor,
                 layer_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """layer_caches: each layer's (K, V) views of kv, [num_blocks, block_size, H_kv, D]
        (see layer_views); a runner builds them once for the life of its pool."""
        self.kv = kv
        self.layer_caches = layer_caches if layer_caches is not None else layer_views(kv)
        self.block_size = block_size
        self.prefills = [s for s in seqs if s.num_new > 1 or s.start == 0]
        decodes = [s for s in seqs if not (s.num_new > 1 or s.start == 0)]
        # Where each new token's K row lives in the pool seen as [rows, H_kv * D], per
        # layer ([L, T]); its V row is block_size rows further. One index_copy_ per layer
        # and K/V then writes the whole batch (advanced indexing into the strided per-layer
        # view was the costlier path).
        num_layers, bs = kv.shape[1], block_size
        self.flat_kv = kv.view(-1, kv.shape[-2] * kv.shape[-1])
        self.k_rows = ((slot_blocks * (num_layers * 2 * bs) + slot_offsets)[None, :]
                       + (torch.arange(num_layers, device=kv.device) * (2 * bs))[:, None])
        self.v_rows = self.k_rows + bs
        self.decode_rows = None
        self.decodes_only = False
        if decodes:
            self._prepare_decode(decodes)

    def _prepare_decode(self, decodes: list[SeqSlice]) -> None:
        device = self.kv.device
        # [B, max_blocks] int64, zero-padded (the kernel never reads past a sequence's blocks)
        self.decode_tables = pad_sequence([s.block_ids for s in decodes], batch_first=True)
        self.decode_lens = torch.tensor([s.start + 1 for s in decodes], device=device)
        self.decode_rows = torch.tensor([s.q_start for s in decodes], device=device)
        # A batch of decodes only, in row order (most steps under load): the kernel's output
        # is the layer's output as it is, no gather of q rows and no scatter back.
        self.decodes_only = not self.prefills and all(s.q_start == i for i, s in enumerate(decodes))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.layer_caches[layer]
        t = k.shape[0]
        dtype = self.flat_kv.dtype
        self.flat_kv.index_copy_(0, self.k_rows[layer], k.reshape(t, -1).to(dtype))
        self.flat_kv.index_copy_(0, self.v_rows[layer], v.reshape(t, -1).to(dtype))
        if self.decodes_only:
            # q is a view of the qkv projection (unit last stride); tables and lens were
            # built to the kernel's contract in _prepare_decode.
            return decode_prepared(q, k_cache, v_cache, self.decode_tables, self.decode_lens,
                                   q.shape[-1] ** -0.5)
        out = torch.empty_like(q)
        for s in self.prefills:
            rows = slice(s.q_start, s.q_start + s.num_new)
            qs = q[rows].transpose(0, 1).unsqueeze(0)                  # [1, Hq, n, D]
            if s.start == 0:
                # Whole sequence in this chunk: attend to the fresh K/V, plain causal.
                ks = k[rows].transpose(0, 1).unsqueeze(0)
                vs = v[rows].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=s.num_new > 1, enable_gqa=True)
            elif q.device.type == "cpu":
                # The chunk sees its whole cached prefix (no mask) and itself causally.
                # Two flash passes merged by their log-sum-exp: the CPU kernel has no
                # bottom-right causal mode, and a materialized [chunk, context] mask is
                # several times slower at long context.
                ks = self._gather(k_cache, s.block_ids, s.start).to(q.dtype)
                vs = self._gather(v_cache, s.block_ids, s.start).to(q.dtype)
                kn = k[rows].transpose(0, 1).unsqueeze(0)
                vn = v[rows].transpose(0, 1).unsqueeze(0)
                o = _prefix_and_causal(qs, ks, vs, kn, vn)
            else:
                ctx = s.start + s.num_new
                ks = self._gather(k_cache, s.block_ids, ctx).to(q.dtype)
                vs = self._gather(v_cache, s.block_ids, ctx).to(q.dtype)
                o = F.scaled_dot_product_attention(
                    qs, ks, vs, attn_mask=causal_lower_right(s.num_new, ctx), enable_gqa=True)
            out[rows] = o.squeeze(0).transpose(0, 1)
        if self.decode_rows is not None:
            out[self.decode_rows] = paged_decode_attention(
                q[self.decode_rows], k_cache, v_cache, self.decode_tables, self.decode_lens)
        return out

    def _gather(self, cache: torch.Tensor, block_ids: torch.Tensor, ctx: int) -> torch.Tensor:
        """[1, H_kv, ctx, D] from the sequence's blocks."""
        g = cache[block_ids].reshape(-1, *cache.shape[2:])[:ctx]
        return g.transpose(0, 1).unsqueeze(0)


def _prefix_and_causal(q, k_prefix, v_prefix, k_new, v_new) -> torch.Tensor:
    """softmax attention of q over [prefix (all visible), new (causal)], all [1, H, n, D]."""
    groups = q.shape[1] // k_prefix.shape[1]
    if groups > 1:
        k_prefix, v_prefix = k_prefix.repeat_interleave(groups, 1), v_prefix.repeat_interleave(groups, 1)
        k_new, v_new = k_new.repeat_interleave(groups, 1), v_new.repeat_interleave(groups, 1)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    o1, lse1 = flash(q, k_prefix, v_prefix)
    o2, lse2 = flash(q, k_new, v_new, is_causal=True)
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m).unsqueeze(-1), torch.exp(lse2 - m).unsqueeze(-1)
    return ((o1 * w1 + o2 * w2) / (w1 + w2)).to(q.dtype)


def layer_views(kv: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (K, V) strided views of the pool [num_blocks, layers, 2, block_size,
    H_kv, D]: [num_blocks, block_size, H_kv, D] each."""
    return [(kv[:, layer, 0], kv[:, layer, 1]) for layer in range(kv.shape[1])]
