"""Lookup-reduce: Triton kernels (interpreter on CPU) against the PyTorch reference.

Outputs and every gradient (values, scores, pre-values, pre-query), over IVE / MCS / V2
variants, non-power-of-two sizes and duplicate rows across tokens, both value-gradient methods.
Tolerance rule (STYLE.md): the kernel's error against an fp64 reference is at most about twice
the same-dtype PyTorch reference's error.

    .venv/bin/python -m pytest tests/ops/test_lookup_reduce.py
"""

from __future__ import annotations

import pytest
import torch

import ultramem.ops.lookup_reduce as lr
from ultramem.ops.lookup_reduce import lookup_reduce, reference

pytestmark = pytest.mark.usefixtures("interpret")

# (T, n, P, D_v, h_c, E, D_p, activation): P < T*n gives duplicate rows across tokens
CASES = [
    (1, 1, 3, 16, 1, 1, 0, "identity"),
    (4, 6, 5, 16, 1, 1, 0, "identity"),
    (3, 5, 7, 12, 2, 3, 0, "identity"),
    (5, 7, 9, 24, 3, 1, 0, "identity"),
    (6, 9, 11, 40, 2, 4, 0, "identity"),
    (2, 9, 10, 6, 3, 1, 4, "silu"),
    (3, 5, 7, 12, 2, 3, 5, "gelu"),
    (7, 4, 6, 20, 1, 2, 3, "identity"),
    (5, 33, 13, 36, 2, 4, 7, "gelu"),
    (9, 17, 300, 96, 2, 4, 32, "silu"),
]


def assert_rule(ours: torch.Tensor, same: torch.Tensor, exact: torch.Tensor, name: str) -> None:
    """``|ours - exact| <= 2 |same - exact| + tiny`` (max norms)."""
    err = (ours.double() - exact).abs().max().item()
    base = (same.double() - exact).abs().max().item()
    scale = exact.abs().max().item() + 1e-12
    assert err <= 2 * base + 1e-6 * scale, f"{name}: kernel err {err:.3g} vs reference err {base:.3g}"


def _inputs(t, n, p, d_v, h_c, e, d_p, dtype=torch.float32, squeeze=False):
    g = torch.Generator().manual_seed(t * 1000 + n * 10 + p)
    v = torch.randn(p, d_v, generator=g).to(dtype)
    idx = torch.randint(0, p, (t, n), generator=g)
    s = torch.randn(t, n, h_c, generator=g)
    if squeeze:
        s = s[..., 0]
    blk = torch.randint(0, e, (t, n), generator=g) if e > 1 else None
    u = torch.randn(p, d_p, generator=g).to(dtype) if d_p else None
    q = torch.randn(t, d_p, generator=g) if d_p else None
    gy = torch.randn(t, e, d_v, generator=g)
    return v, idx, s, blk, u, q, gy


def _run(inputs, e, act, impl, dtype):
    """Output and gradients of the differentiable inputs, computed in ``dtype``."""
    v, idx, s, blk, u, q, gy = inputs
    leaves = [x.detach().to(dtype).requires_grad_() if x is not None else None for x in (v, s, u, q)]
    lv, ls, lu, lq = leaves
    out = lookup_reduce(lv, idx, ls, blk, e, lu, lq, act, impl=impl)
    wrt = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(out, wrt, gy.to(out.dtype))
    return [out, *grads]


@pytest.mark.parametrize("method", ["sort", "atomic"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_reference(case, method, monkeypatch):
    t, n, p, d_v, h_c, e, d_p, act = case
    monkeypatch.setattr(lr, "DV_METHOD", method)
    inputs = _inputs(t, n, p, d_v, h_c, e, d_p)
    assert len(set(inputs[1].flatten().tolist())) < t * n or t * n == 1  # duplicates exercised
    ours = _run(inputs, e, act, "triton", torch.float32)
    same = _run(inputs, e, act, "torch", torch.float32)
    exact = _run(inputs, e, act, "torch", torch.float64)
    names = ["out", "d_values", "d_scores", "d_pre_values", "d_pre_query"]
    for o, s_, x, name in zip(ours, same, exact, names):
        assert o.shape == x.shape and o.dtype == s_.dtype, name
        assert_rule(o, s_, x, name)


@pytest.mark.parametrize("piece", [1, 3, 64])
def test_sort_hot_rows_staged(piece, monkeypatch):
    """Rows selected more than SORT_PIECE times are summed in pieces through the fp32 staging
    table; the gradient equals the atomic one and the reference."""
    monkeypatch.setattr(lr._kernels, "SORT_PIECE", piece)
    inputs = _inputs(6, 9, 5, 16, 2, 2, 0)  # 54 selections over 5 rows
    grads = {}
    for method in ("sort", "atomic"):
        monkeypatch.setattr(lr, "DV_METHOD", method)
        grads[method] = _run(inputs, 2, "identity", "triton", torch.float32)[1]
    ref = _run(inputs, 2, "identity", "torch", torch.float32)[1]
    torch.testing.assert_close(grads["sort"], grads["atomic"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["sort"], ref, rtol=1e-5, atol=1e-5)


def test_two_dim_scores_and_dispatch():
    inputs = _inputs(3, 4, 6, 8, 1, 1, 0, squeeze=True)
    v, idx, s, *_ = inputs
    ours = lookup_reduce(v, idx, s, impl="triton")
    ref = reference.lookup_reduce(v, idx, s)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    s = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(lookup_reduce(v, idx, s, impl="triton").sum(), [s])
    assert g.shape == s.shape


@pytest.mark.parametrize("case", [CASES[4], CASES[8]], ids=["ive_mcs", "v2_gelu"])
def test_bf16_table(case):
    """bf16 tables: fp32 accumulation, within the rule against the bf16 reference."""
    t, n, p, d_v, h_c, e, d_p, act = case
    inputs = _inputs(t, n, p, d_v, h_c, e, d_p, dtype=torch.bfloat16)
    ours = _run(inputs, e, act, "triton", torch.bfloat16)
    same = _run(inputs, e, act, "torch", torch.bfloat16)
    exact = _run(inputs, e, act, "torch", torch.float64)
    for o, s_, x, name in zip(ours, same, exact, ["out", "d_values", "d_scores", "d_pre", "d_q"]):
        assert o.dtype == s_.dtype, name
        assert_rule(o, s_, x, name)


def test_no_kernel_falls_back(monkeypatch):
    """Without Triton (or off the interpreter on CPU) every impl runs the reference."""
    v, idx, s, blk, *_ = _inputs(2, 3, 4, 8, 2, 2, 0)
    ref = reference.lookup_reduce(v, idx, s, blk, 2)
    monkeypatch.setattr(lr, "_kernels", None)
    for impl in ("auto", "triton", "torch"):
        torch.testing.assert_close(lookup_reduce(v, idx, s, blk, 2, impl=impl), ref)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not lr.triton_available(v)
