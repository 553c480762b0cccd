"""What the transfer server needs from a prefill engine: the one swap point on P.

The engine implements `PrefillBackend`; tests and the benchmark use
`splitserve.transfer.synthetic.SyntheticBackend`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator, Union

from splitserve.sampling_params import SamplingParams
from splitserve.transfer.protocol import FirstTokenLogprobs


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)  # P samples the first token
    num_blocks: int = 0      # blocks D reserved: ceil(len(token_ids) / block_size)


@dataclass(frozen=True)
class BlocksReady:
    """Logical blocks [first_block, first_block + len(block_ids)) are final in P's KV at
    physical ids `block_ids` and stay pinned until `release`."""

    first_block: int
    block_ids: list[int]


@dataclass(frozen=True)
class Progress:
    tokens_done: int
    tokens_total: int


@dataclass(frozen=True)
class Done:
    first_token: int
    logprobs: FirstTokenLogprobs | None = None   # set when the request asked for logprobs


Event = Union[BlocksReady, Progress, Done]


class PrefillBackend(ABC):
    @abstractmethod
    def start(self, request: PrefillRequest) -> Iterator[Event]:
        """Begin the prefill; yield its events in order on the calling (dedicated) thread.

        Contract: BlocksReady events cover logical blocks 0..num_blocks-1 in order, without
        gaps; Progress may come any time (it keeps D's stall timer alive during long
        compute); Done comes last. Raising ends the request with an ERROR sent to D.
        """

    @abstractmethod
    def release(self, request_id: str) -> None:
        """Unpin the request's blocks (they may stay in the prefix cache) and abort its
        prefill if still running; the iterator from `start` must then end soon. Called
        exactly once per started request, from any thread."""
