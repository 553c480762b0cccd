import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)

from splitserve.model.tiny import make_tiny_llama, make_tiny_qwen2  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


def pytest_configure(config):
    # Hermetic model cache: the embedded default is converted once per test session into a
    # temporary folder that every test and every server subprocess shares (through the env).
    if "SPLITSERVE_CACHE" not in os.environ:
        config._splitserve_cache = tempfile.mkdtemp(prefix="splitserve-cache-")
        os.environ["SPLITSERVE_CACHE"] = config._splitserve_cache


def pytest_unconfigure(config):
    cache = getattr(config, "_splitserve_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
        del os.environ["SPLITSERVE_CACHE"]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model, converted into the session's cache."""
    from splitserve.model.registry import resolve_model

    return resolve_model(None)


@pytest.fixture
def no_compiler(monkeypatch):
    """no_compiler(ext): from now on in this test, building the NativeExtension ext fails
    as on a machine without a C++ compiler (and nothing built earlier is reused)."""
    def fail():
        raise RuntimeError("no C++ compiler")

    def apply(ext) -> None:
        monkeypatch.setattr(ext, "_module", None)
        monkeypatch.setattr(ext, "_load_error", None)
        monkeypatch.setattr(ext, "_build", fail)
    return apply
