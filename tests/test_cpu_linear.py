"""Models on CPU can run their linear layers as prepacked oneDNN matmuls (by default
bfloat16 everywhere and float32 on CPUs other than Intel's; always with
`cpu_linear="onednn"`): the numbers must be those of the plain layers, for every row
count the engine uses; `cpu_linear="torch"` never packs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from golden import random_prompt
from splitserve.model import cpu_linear
from splitserve.model.cpu_linear import PackedLinear, packing_supported
from splitserve.model.loader import load_model
from splitserve.model.tiny import make_tiny_llama
from test_model import SingleSequenceAttention

CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(not packing_supported(torch.bfloat16, CPU),
                                reason="this CPU has no oneDNN bfloat16 support")
pytestmark = pytest.mark.skipif(not packing_supported(torch.float32, CPU),
                                reason="this torch has no oneDNN")
# (dtype, atol, rtol) against a float32 F.linear. float32: only the summation order
# differs. bfloat16: both accumulate in float32 and round once, within one bf16 ulp.
DTYPES = [pytest.param(torch.float32, 1e-5, 1e-5, id="float32"),
          pytest.param(torch.bfloat16, 2e-2, 8e-3, id="bfloat16", marks=needs_bf16)]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 16, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_the_plain_one(rows, bias, dtype, atol, rtol):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(96, 64, generator=g) * 0.1).to(dtype)
    b = torch.randn(96, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, 64, generator=g).to(dtype)
    with torch.inference_mode():
        got = PackedLinear(w, b)(x)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)


def _logits(model, ids, dtype):
    with torch.inference_mode():
        return model.compute_logits(model.embed_tokens(ids).to(dtype))


@needs_bf16
def test_a_bfloat16_model_is_packed_and_keeps_its_logits(tmp_path):
    model_dir = make_tiny_llama(tmp_path, dtype=torch.bfloat16)
    packed = load_model(model_dir, dtype="bfloat16")
    plain32 = load_model(model_dir, dtype="float32")
    assert isinstance(load_model(model_dir, dtype="bfloat16", cpu_linear="torch").layers[0].mlp.gate_up_proj,
                      torch.nn.Linear)
    assert isinstance(packed.layers[0].mlp.gate_up_proj, PackedLinear)
    assert isinstance(packed.tied_head if packed.lm_head is None else packed.lm_head, PackedLinear)
    ids = torch.tensor(random_prompt(24, seed=5))
    # The stated bfloat16 tolerance of the golden tests (test_model.py).
    torch.testing.assert_close(_logits(packed, ids, torch.bfloat16), _logits(plain32, ids, torch.float32),
                               atol=0.3, rtol=0.05)


def test_a_packed_float32_model_has_the_plain_models_logits(tmp_path):
    model_dir = make_tiny_llama(tmp_path)
    packed = load_model(model_dir, dtype="float32", cpu_linear="onednn")
    plain = load_model(model_dir, dtype="float32", cpu_linear="torch")
    assert isinstance(packed.layers[0].self_attn.qkv_proj, PackedLinear)
    assert isinstance(packed.tied_head if packed.lm_head is None else packed.lm_head, PackedLinear)
    assert isinstance(plain.layers[0].self_attn.qkv_proj, torch.nn.Linear)
    assert plain.tied_head is None
    ids = torch.tensor(random_prompt(24, seed=5))
    positions = torch.arange(len(ids))
    with torch.inference_mode():
        got = packed.compute_logits(packed(ids, positions, SingleSequenceAttention(len(packed.layers))))
        want = plain.compute_logits(plain(ids, positions, SingleSequenceAttention(len(plain.layers))))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("vendor,packs_float32", [("GenuineIntel", False), ("AuthenticAMD", True), ("", True)])
def test_auto_packs_float32_except_on_intel_cpus(monkeypatch, vendor, packs_float32):
    # MKL's sgemm (behind F.linear) is fast on Intel's CPUs only; oneDNN is fast on both.
    monkeypatch.setattr(cpu_linear, "cpu_vendor", lambda: vendor)
    assert cpu_linear.should_pack("auto", torch.float32, CPU) is packs_float32
    assert cpu_linear.should_pack("onednn", torch.float32, CPU)
    assert not cpu_linear.should_pack("torch", torch.float32, CPU)
    assert not cpu_linear.should_pack("auto", torch.float32, torch.device("meta"))


# Packs two linear layers, multiplies 300 different row counts through them, and prints
# its private memory after the first 100 and at the end.
_MANY_ROW_COUNTS = """
import random
import torch
from torch import nn
from splitserve.model.cpu_linear import pack_linears

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) >> 10

model = nn.Sequential(nn.Linear(576, 1536), nn.Linear(1536, 576))
pack_linears(model)
with torch.inference_mode():
    for i, rows in enumerate(random.Random(0).sample(range(64, 1025), 300)):
        model(torch.randn(rows, 576))
        if i == 100:
            warm = rss_mib()
print(warm, rss_mib())
"""


def test_memory_stays_flat_over_many_row_counts():
    # oneDNN keeps a primitive per row count, with buffers the size of its output, in two
    # caches of 1,024 entries by default: a prefill worker grew by hundreds of MiB.
    env = {k: v for k, v in os.environ.items()
           if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    done = subprocess.run([sys.executable, "-c", _MANY_ROW_COUNTS], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    warm, end = map(int, done.stdout.split())
    assert end - warm <= 32, (warm, end)
