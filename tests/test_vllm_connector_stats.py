"""The connector's stats report (SplitserveKVStats): what a vLLM worker process tells the
API process each step. Counters travel as changes and add up over tensor-parallel ranks;
the per-load reports and incidents travel once each, every rank's kept."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from splitserve.transfer.config import FetchResult, Outcome, TransferStats  # noqa: E402
from splitserve.vllm_connector.stats import SplitserveKVStats  # noqa: E402


def _stats(ok: int, fallback: int) -> TransferStats:
    s = TransferStats()
    for _ in range(ok):
        s.record_fetch(FetchResult(Outcome.OK, "", 4, 7, 1000, 0, 0, 0.5, "shm"))
    for _ in range(fallback):
        s.record_fetch(FetchResult(Outcome.PEER_DEAD, "refused", 1, None, 250, 1, 0, 2.0, "shm"))
    return s


def test_a_report_is_the_change_since_the_last_one_plus_its_new_loads():
    stats = _stats(ok=2, fallback=0)
    first = SplitserveKVStats.of(stats, [{"transfer_id": "a", "tokens": 64}])
    delta = first.minus(SplitserveKVStats.zero())
    assert delta.data["transfers"] == {"ok": 2} and delta.data["fetches"] == [
        {"transfer_id": "a", "tokens": 64}]
    stats.record_fetch(FetchResult(Outcome.PEER_DEAD, "refused", 1, None, 250, 1, 0, 2.0, "shm"))
    second = SplitserveKVStats.of(stats, [], [["fallback", "b", "peer_dead", "", ""]])
    delta = second.minus(first)
    assert delta.data["transfers"] == {"peer_dead": 1} and delta.data["fallbacks"] == {
        "peer_dead": 1}
    assert delta.data["bytes_received"] == 250 and delta.data["fetches"] == []
    assert delta.data["incidents"] == [["fallback", "b", "peer_dead", "", ""]]
    assert not delta.is_empty()
    assert SplitserveKVStats.of(stats).minus(SplitserveKVStats.of(stats)).is_empty()
    # A report with only a list in it is not empty: vLLM would drop it otherwise.
    assert not SplitserveKVStats.zero().aggregate(
        SplitserveKVStats(data={"fetches": [{"transfer_id": "c"}]})).is_empty()


def test_ranks_reports_add_up_and_keep_every_ranks_loads():
    rank0 = SplitserveKVStats.of(_stats(1, 0), [{"transfer_id": "t", "tokens": 64}])
    rank1 = SplitserveKVStats.of(_stats(1, 1), [{"transfer_id": "t", "tokens": 32}],
                                 [["fallback", "t", "peer_dead", "", ""]])
    both = rank0.aggregate(rank1)
    assert both.data["transfers"] == {"ok": 2, "peer_dead": 1}
    assert both.data["fetches"] == [{"transfer_id": "t", "tokens": 64},
                                    {"transfer_id": "t", "tokens": 32}]
    assert both.data["incidents"] == [["fallback", "t", "peer_dead", "", ""]]
    assert both.reduce()["transfers_ok"] == 2 and "fetches" not in both.reduce()
