"""The prefill side of the vLLM connector without a vLLM engine: the per-step metadata a
scheduler would send drives `Producer`, a real KV server streams to a real `fetch_kv`
into vLLM-shaped KV (one tensor per layer)."""

import threading
import time

import pytest
import torch

from splitserve.transfer import (KVTransferServer, Outcome, PrefillRequest, TransferConfig,
                                 TransferStats, fetch_kv, kv_fingerprint)
from splitserve.transfer.kvmem import KVBlocks

pytest.importorskip("vllm")

from splitserve.vllm_connector.metadata import SendStep  # noqa: E402
from splitserve.vllm_connector.producer import Producer  # noqa: E402

NUM_BLOCKS, BLOCK = 32, 16
PROMPT = list(range(100, 100 + 5 * BLOCK - 3))      # 5 blocks, the last one partial
P_IDS = [7, 8, 9, 3, 20]
D_IDS = [1, 2, 30, 31, 4]
CFG = TransferConfig(transport="tcp", heartbeat_interval=0.2, stall_timeout=5.0, lease=5.0)


def layers(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.randn(NUM_BLOCKS, 2, BLOCK, 16, generator=g) for i in range(3)}


class Pair:
    def __init__(self, lease: float = 5.0):
        self.p_layers, self.d_layers = layers(1), layers(2)
        self.p = KVBlocks.from_layers(self.p_layers, NUM_BLOCKS, BLOCK)
        self.d = KVBlocks.from_layers(self.d_layers, NUM_BLOCKS, BLOCK)
        self.stats = TransferStats()
        self.producer = Producer(BLOCK, lease, CFG.heartbeat_interval, self.stats)
        self.server = KVTransferServer(self.p, kv_fingerprint(self.p), CFG, self.producer,
                                       stats=self.stats, partial_start=True)
        self.server.start()
        self.result = None

    def fetch(self, tid: str, prompt=PROMPT) -> threading.Thread:
        def run():
            req = PrefillRequest(tid, list(prompt), num_blocks=len(D_IDS))
            self.result = fetch_kv(self.server.address, req, D_IDS, self.d, CFG,
                                   kv_fingerprint(self.d))
        t = threading.Thread(target=run)
        t.start()
        return t

    def arrived(self, logical: int) -> bool:
        return all(torch.equal(self.d_layers[k][D_IDS[logical]], self.p_layers[k][P_IDS[logical]])
                   for k in self.p_layers)

    def step(self, tid: str, done: int, new: list[int], first: bool = False) -> None:
        self.producer.on_step(SendStep("req-1", tid, done, len(PROMPT), new,
                                       list(PROMPT) if first else None))


def wait(check, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_blocks_stream_per_step_and_stay_held_until_vllm_may_free_them():
    pair = Pair()
    try:
        t = pair.fetch("x1")             # D asks before P's vLLM has even scheduled it
        pair.step("x1", 2 * BLOCK, P_IDS[:2], first=True)
        wait(lambda: pair.arrived(0) and pair.arrived(1), "the first step's blocks at D")
        assert not pair.arrived(2)        # the prompt is still computing
        pair.step("x1", 4 * BLOCK + 5, P_IDS[2:])   # the last, partial block is not final
        wait(lambda: pair.arrived(3), "the second step's whole blocks at D")
        assert t.is_alive()
        pair.step("x1", len(PROMPT), [])
        t.join(20)
        assert pair.result.ok, pair.result.reason
        assert all(pair.arrived(i) for i in range(5))
        # vLLM must not free the blocks before it reported the request finished ...
        assert pair.producer.finished_sending(set()) == set()
        pair.producer.on_finished("req-1", "x1")
        freed: list[str] = []       # D's RELEASE reaches P's reader thread on its own time
        wait(lambda: freed.extend(pair.producer.finished_sending({"req-1"})) or freed,
             "the blocks to be handed back")
        assert freed == ["req-1"]
        assert pair.producer.finished_sending({"req-1"}) == set()     # exactly once
    finally:
        pair.server.close()


def test_lease_expires_when_no_decode_ever_asks():
    pair = Pair(lease=0.5)
    try:
        pair.step("x2", len(PROMPT), P_IDS, first=True)
        pair.producer.on_finished("req-1", "x2")
        assert pair.producer.finished_sending({"req-1"}) == set()    # held for D
        wait(lambda: pair.producer.finished_sending(set()) == {"req-1"}, "the lease to expire")
        assert pair.stats.snapshot()["lease_expired"] == 1
        # A decode worker that comes after the lease hears why at once.
        pair.fetch("x2").join(20)
        assert pair.result.outcome is Outcome.PEER_ERROR
        assert "lease expired" in pair.result.reason
    finally:
        pair.server.close()


def test_aborted_prefill_ends_the_transfer_keeping_what_arrived():
    pair = Pair()
    try:
        t = pair.fetch("x3")
        pair.step("x3", 2 * BLOCK, P_IDS[:2], first=True)
        wait(lambda: pair.arrived(1), "the first blocks at D")
        # As the connector does before the step whose forward may reuse the blocks.
        pair.producer.on_aborted("x3", "the request was preempted on the prefill worker")
        pair.server.drop("x3", "the request was preempted on the prefill worker")
        assert pair.server.jobs() == []
        t.join(20)
        assert pair.result.outcome is Outcome.PEER_ERROR
        assert "preempted" in pair.result.reason
        assert pair.result.blocks_verified == 2
    finally:
        pair.server.close()


def test_decode_with_another_prompt_is_refused():
    pair = Pair()
    try:
        pair.step("x4", len(PROMPT), P_IDS, first=True)
        pair.fetch("x4", prompt=[1] + PROMPT[1:]).join(20)
        assert pair.result.outcome is Outcome.PEER_ERROR
        assert "differs" in pair.result.reason
    finally:
        pair.server.close()


def test_unknown_transfer_is_refused_after_one_lease():
    pair = Pair(lease=0.6)
    try:
        pair.fetch("never-sent").join(20)
        assert pair.result.outcome is Outcome.PEER_ERROR
        assert "no such prefill request" in pair.result.reason
    finally:
        pair.server.close()
