"""The Llama-family decoder (Llama 2/3/3.1, Mistral without sliding window, Qwen2 =
Llama + q/k/v bias), vLLM style: the tokens of every sequence in the batch are
flattened into one [T] axis, with no batch dimension and no padding.

The model owns projections, norms, RoPE and the MLP; everything that depends on which
sequence a token belongs to (causality, the KV cache, GQA, the softmax scale) lives in
the AttentionFn the caller passes in.

Numerics follow transformers' LlamaForCausalLM step for step (RMSNorm computed in
float32 then cast back before the weight, cos/sin from float32 angles, residual adds in
the model dtype), so a float32 model reproduces its logits to ~1e-5. On CPU the norms
(with the residual add before them), RoPE and SiLU*up run as fused C++ kernels with those
same roundings (model.fused_ops): a decode step is dozens of small ops per layer, and
their per-op cost, not their arithmetic, was a fifth of a lone sequence's step.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.model import fused_ops
from splitserve.model.config import ModelArchConfig
from splitserve.model.rope import RotaryEmbedding

# attn(layer_idx, q [T, num_heads, head_dim], k [T, num_kv_heads, head_dim],
#      v [T, num_kv_heads, head_dim]) -> [T, num_heads, head_dim].
# q and k arrive with RoPE applied; v may be a non-contiguous view.
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with a residual, (norm(residual + x), residual + x) — in place where
        the fused kernel runs, so neither input is read again by the caller."""
        if residual is None:
            return fused_ops.rms_norm(x, self.weight, self.eps)
        return fused_ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelArchConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        # One matmul for q, k and v (rows in that order); the loader fills the slices.
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionFn) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q, k = fused_ops.rotary(q.view(t, self.num_heads, self.head_dim),
                                k.view(t, self.num_kv_heads, self.head_dim), cos, sin)
        out = attn(self.layer_idx, q, k, v.view(t, self.num_kv_heads, self.head_dim))
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelArchConfig):
        super().__init__()
        # gate rows first, then up rows: one matmul instead of two.
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fused_ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelArchConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, attn: AttentionFn) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (this layer's MLP output, the residual stream before it): the
        stream after the layer is their sum, added by the next norm (vLLM's layout, which
        lets each add be fused into the norm after it). The first layer gets residual None."""
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, cos, sin, attn)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class CausalLM(nn.Module):
    def __init__(self, config: ModelArchConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # NOTE: tied checkpoints get no lm_head module at all; compute_logits reads the
        # embedding matrix. Sharing one Parameter between two modules would not survive
        # the loader's meta -> device materialization.
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        # Tied checkpoints on CPU with packed linears: a prepacked copy of the embedding
        # matrix for the vocabulary projection (see model.cpu_linear); set by the loader.
        self.tied_head: nn.Module | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionFn) -> torch.Tensor:
        """input_ids, positions: [T] (all sequences of the batch, flattened) ->
        final-normed hidden states [T, hidden_size]."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin, attn)
        return self.norm(h) if residual is None else self.norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden_size] -> float32 [N, vocab_size]. Call it on the rows that sample
        only: the vocabulary projection is the largest matmul of a decode step."""
        head = self.lm_head if self.lm_head is not None else self.tied_head
        if head is not None:
            return head(hidden).float()
        return F.linear(hidden, self.embed_tokens.weight).float()
