"""What the scheduler-side connector tells its workers each step (vLLM pickles it to every
tensor-parallel rank; each rank acts on its own shard of the same block ids).

Request ids here are vLLM's (unique per engine); `transfer_id` is the pair's shared id
from kv_transfer_params, the request id on the KV wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class SendStep:
    """P: after this step's forward, `tokens_done` of the prompt's tokens are in KV.
    `new_block_ids` extend the request's block list (in order); `prompt` is set the first
    time a transfer appears (D's PREFILL is checked against it)."""

    req_id: str
    transfer_id: str
    tokens_done: int
    num_prompt_tokens: int
    new_block_ids: list[int]
    prompt: list[int] | None = None


@dataclass
class RecvSpec:
    """D: pull transfer `transfer_id` from P's KV server into `block_ids` (logical block i
    lands in block_ids[i]); the first `have_blocks` are local prefix-cache hits."""

    req_id: str
    transfer_id: str
    host: str
    port: int
    prompt: list[int]
    block_ids: list[int]
    have_blocks: int


@dataclass
class SplitserveMetadata(KVConnectorMetadata):
    sends: list[SendStep] = field(default_factory=list)
    finished: dict[str, str] = field(default_factory=dict)     # P: req_id -> transfer_id, blocks held
    aborted: dict[str, str] = field(default_factory=dict)      # P: transfer_id -> why it will never finish
    recvs: list[RecvSpec] = field(default_factory=list)
    cancels: dict[str, str] = field(default_factory=dict)      # D: req_id -> why its load is moot
