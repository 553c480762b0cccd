"""The decoder's fused elementwise kernels (splitserve/model/fused_ops.py,
csrc/layer_ops.cpp) give what the eager torch ops give, at each dtype, for the layouts the
model hands them (views of the qkv projection, odd widths, one row and thousands)."""

from __future__ import annotations

import logging

import pytest
import torch

from splitserve.model import fused_ops

DTYPES = [torch.float32, torch.bfloat16]
ROWS = [1, 7, 3000]     # a decode step, a small batch, a prefill chunk (threaded path)


def torch_path(fn, *args):
    """fn(*args) on fused_ops' torch path."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(fused_ops, "ENABLED", False)
        return fn(*args)


def _tol(dtype):
    # float32: only the RMSNorm's summation order differs. bfloat16: one rounding step
    # where a float32 intermediate lands on a rounding boundary.
    return dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2 ** -8, rtol=2 ** -7)


def test_the_kernels_are_built_here():
    assert fused_ops.KERNELS.load() is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", [576, 37])
def test_rms_norm_and_the_fused_residual_add(dtype, rows, hidden):
    g = torch.Generator().manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    res = (3 * torch.randn(rows, hidden, generator=g)).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    want = torch_path(fused_ops.rms_norm, x, w, 1e-5)
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-5), want, **_tol(dtype))

    want_norm, want_sum = torch_path(fused_ops.add_rms_norm, x.clone(), res.clone(), w, 1e-5)
    norm, total = fused_ops.add_rms_norm(x.clone(), res.clone(), w, 1e-5)
    assert torch.equal(total, want_sum)        # the residual add rounds exactly as torch's
    torch.testing.assert_close(norm, want_norm, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_rotary_in_place_on_views_of_the_qkv_projection(dtype, rows):
    hq, hkv, d = 9, 3, 64
    g = torch.Generator().manual_seed(rows)
    qkv = torch.randn(rows, (hq + 2 * hkv) * d, generator=g).to(dtype)
    angles = torch.arange(rows, dtype=torch.float32)[:, None] * torch.rand(d // 2, generator=g)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def views(t):
        q, k, v = t.split([hq * d, hkv * d, hkv * d], dim=-1)
        return q.view(rows, hq, d), k.view(rows, hkv, d), v

    wq, wk = torch_path(fused_ops.rotary, *views(qkv.clone())[:2], cos, sin)
    out = qkv.clone()
    q, k, v = views(out)
    fused_ops.rotary(q, k, cos, sin)
    # Two products and a sum, each rounded as torch rounds them: equal at every dtype.
    assert torch.equal(q, wq) and torch.equal(k, wk)
    assert torch.equal(v, views(qkv)[2])      # v, beside q and k in memory, untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("inter", [1536, 45])
def test_silu_times_up(dtype, rows, inter):
    g = torch.Generator().manual_seed(rows * inter)
    gate_up = (4 * torch.randn(rows, 2 * inter, generator=g)).to(dtype)
    torch.testing.assert_close(fused_ops.silu_mul(gate_up), torch_path(fused_ops.silu_mul, gate_up),
                               **_tol(dtype))


def test_without_a_compiler_the_torch_path_runs_and_warns_once(no_compiler, caplog):
    no_compiler(fused_ops.KERNELS)
    gate_up = torch.randn(5, 8)
    with caplog.at_level(logging.WARNING, logger="splitserve.native"):
        out = fused_ops.silu_mul(gate_up)
        fused_ops.rms_norm(gate_up, torch.ones(8), 1e-6)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()


def test_unsupported_inputs_take_the_torch_path():
    # float64, mixed dtypes and a strided last dim are outside the kernels' contract: the
    # torch path's answer, no error.
    x = torch.randn(4, 16, dtype=torch.float64)
    w = torch.ones(16, dtype=torch.float64)
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-6), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    w16 = torch.ones(16, dtype=torch.bfloat16)  # dtypes differ: torch's promotion rules apply
    x32 = x.float()
    torch.testing.assert_close(fused_ops.rms_norm(x32, w16, 1e-6), torch_path(fused_ops.rms_norm, x32, w16, 1e-6))
    gate_up = torch.randn(16, 4).t()          # [4, 16], last-dim stride 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused_ops.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)
