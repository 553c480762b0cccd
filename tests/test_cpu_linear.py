"""bfloat16 models on CPU run their linear layers as prepacked oneDNN matmuls: the
numbers must be those of the plain layers, for every row count the engine uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from golden import random_prompt
from splitserve.model.cpu_linear import PackedLinear, packing_supported
from splitserve.model.loader import load_model
from splitserve.model.tiny import make_tiny_llama

pytestmark = pytest.mark.skipif(not packing_supported(torch.bfloat16, torch.device("cpu")),
                                reason="this CPU has no oneDNN bfloat16 support")


@pytest.mark.parametrize("rows", [1, 7, 16, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_the_plain_one(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(96, 64, generator=g) * 0.1).bfloat16()
    b = torch.randn(96, generator=g).bfloat16() if bias else None
    x = torch.randn(rows, 64, generator=g).bfloat16()
    with torch.inference_mode():
        got = PackedLinear(w, b)(x)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    # Both accumulate in float32 and round once to bfloat16: within one bf16 ulp.
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=8e-3)


def test_a_bfloat16_model_is_packed_and_keeps_its_logits(tmp_path):
    model_dir = make_tiny_llama(tmp_path, dtype=torch.bfloat16)
    packed = load_model(model_dir, dtype="bfloat16")
    plain32 = load_model(model_dir, dtype="float32")
    assert isinstance(packed.layers[0].mlp.gate_up_proj, PackedLinear)
    assert isinstance(packed.tied_head if packed.lm_head is None else packed.lm_head, PackedLinear)
    # float32 keeps plain layers: packing does not make it faster.
    assert isinstance(plain32.layers[0].mlp.gate_up_proj, torch.nn.Linear)
    ids = torch.tensor(random_prompt(24, seed=5))
    with torch.inference_mode():
        hidden = packed.embed_tokens(ids)
        got = packed.compute_logits(hidden)
        want = plain32.compute_logits(hidden.float())
    # The stated bfloat16 tolerance of the golden tests (test_model.py).
    torch.testing.assert_close(got, want, atol=0.3, rtol=0.05)
