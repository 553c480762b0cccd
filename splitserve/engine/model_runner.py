"""Turns a SchedulerOutput into one model forward pass over the paged KV cache and the
sampled next tokens. The only part of the engine that touches tensors."""

from __future__ import annotations

import torch

from splitserve.engine.attention import PagedAttention, SeqSlice, layer_views
from splitserve.engine.kv_cache import KVLayout
from splitserve.engine.paged_decode import kernel_available
from splitserve.engine.sampler import Sampled, SampleFailure, Sampler
from splitserve.engine.scheduler import SchedulerOutput
from splitserve.model import fused_ops


class ModelRunner:
    def __init__(self, model, layout: KVLayout, num_blocks: int, device: str, seed: int = 0,
                 kv_allocator=None):
        self.model = model
        self.layout = layout
        self.device = torch.device(device)
        self.kv = layout.allocate(num_blocks, device, kv_allocator)
        self.layer_caches = layer_views(self.kv)
        self.sampler = Sampler(seed)
        if self.device.type == "cpu":
            # Build (first time on this machine: ~30 s each) or load the C++ kernels now,
            # while the worker is still starting, not on its first step.
            kernel_available()
            fused_ops.KERNELS.load()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> dict[str, Sampled | SampleFailure]:
        """Runs the forward for every scheduled request; returns request id -> sampled
        token (or why that request's row could not be sampled) for the requests whose
        known tokens are now all computed."""
        bs = self.layout.block_size
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []
        seqs: list[SeqSlice] = []
        slot_blocks: list[torch.Tensor] = []
        sample_rows: list[int] = []
        sampled_reqs = []
        for s in sched.scheduled:
            r = s.request
            start, n = r.num_computed_tokens, s.num_new_tokens
            q_start = len(input_ids)
            input_ids.extend(r.all_token_ids[start:start + n])
            pos = torch.arange(start, start + n)
            positions.append(pos)
            num_blocks = -(-(start + n) // bs)
            table = torch.tensor(s.block_table[:num_blocks], dtype=torch.long)
            slot_blocks.append(table[pos // bs])
            seqs.append(SeqSlice(q_start, n, start, table.to(self.device)))
            if s.samples:
                sample_rows.append(q_start + n - 1)
                sampled_reqs.append(r)
        pos_all = torch.cat(positions)
        attn = PagedAttention(
            self.kv, bs, seqs,
            slot_blocks=torch.cat(slot_blocks).to(self.device),
            slot_offsets=(pos_all % bs).to(self.device), layer_caches=self.layer_caches)
        hidden = self.model(torch.tensor(input_ids, device=self.device), pos_all.to(self.device), attn)
        if not sampled_reqs:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        tokens = self.sampler.sample(logits, [r.params for r in sampled_reqs],
                                     [r.generator for r in sampled_reqs], requests=sampled_reqs)
        return {r.request_id: t for r, t in zip(sampled_reqs, tokens)}
