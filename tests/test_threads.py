"""Engines on one machine share its cores: serve's workers spin briefly before sleeping,
a worker takes --threads."""

from __future__ import annotations

import pytest
import torch

from splitserve.cli import serve_cmd
from splitserve.cli.engine_args import engine_argv
from splitserve.cli.main import build_parser
from splitserve.config import ConfigError, EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.model.tiny import make_tiny_llama


def test_serve_workers_share_the_cores_and_spin_briefly(monkeypatch):
    monkeypatch.setattr(serve_cmd.os, "sched_getaffinity", lambda _pid: {0, 1})
    assert serve_cmd._share_cores(2, {}) == {"GOMP_SPINCOUNT": serve_cmd.SHARED_CORES_SPIN}
    # One worker has the cores to itself; OpenMP settings the user gave are kept.
    assert serve_cmd._share_cores(1, {}) == {}
    assert serve_cmd._share_cores(2, {"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert serve_cmd._share_cores(3, {"GOMP_SPINCOUNT": "0"}) == {}


def test_threads_reach_the_worker_command_line():
    args = build_parser().parse_args(["worker", "--threads", "3"])
    assert args.threads == 3
    assert engine_argv(EngineConfig(threads=3)) == ["--threads", "3"]


def test_bad_thread_counts_are_refused():
    with pytest.raises(ConfigError, match="threads"):
        EngineConfig(threads=0)


def test_engine_applies_its_thread_count(tmp_path):
    before = torch.get_num_threads()
    try:
        LLMEngine(EngineConfig(model=str(make_tiny_llama(tmp_path)), threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
