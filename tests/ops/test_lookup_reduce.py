"""Lookup-reduce: Triton kernels (interpreter on CPU) against the PyTorch reference.

Outputs and every gradient (values, scores, pre-values, pre-query), over IVE / MCS / V2
variants, non-power-of-two sizes and duplicate rows across tokens, plus the value gradient's
hot-row path (chunks, carries) on its own and every forward tile path.
Tolerance rule (STYLE.md): the kernel's error against an fp64 reference is at most about twice
the same-dtype PyTorch reference's error.

    .venv/bin/python -m pytest tests/ops/test_lookup_reduce.py
"""

from __future__ import annotations

import pytest
import torch
from op_rules import assert_rule

from ultramem.ops.lookup_reduce import lookup_reduce, reference
from ultramem.ops.tuning import TUNING, tuned

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("interpret")]


@pytest.fixture
def fwd():
    """The forward kernel module (imported here: under the interpreter only)."""
    import ultramem.ops.lookup_reduce.triton_forward as kernels

    return kernels


@pytest.fixture
def bwd():
    """The backward kernel module."""
    import ultramem.ops.lookup_reduce.triton_backward as kernels

    return kernels

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


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_reference(case):
    t, n, p, d_v, h_c, e, d_p, act = case
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
def test_hot_rows(piece, monkeypatch, bwd):
    """Rows selected more than DENSE_PIECE times take the hot-row path (chunk carries); the
    gradient equals the reference."""
    monkeypatch.setattr(bwd, "DENSE_PIECE", piece)
    inputs = _inputs(6, 9, 5, 16, 2, 2, 0)  # 54 selections over 5 rows
    ours = _run(inputs, 2, "identity", "triton", torch.float32)[1]
    ref = _run(inputs, 2, "identity", "torch", torch.float32)[1]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _scatter_ref(p, idx, w, blk, e, go, dtype):
    """``scatter_rows`` in PyTorch (``index_add_``), accumulated in ``dtype``."""
    t, n = idx.shape
    h_c, d_v = w.shape[-1], go.shape[-1]
    b = blk if e > 1 else torch.zeros_like(idx)
    rows = go.to(dtype)[torch.arange(t)[:, None], b].view(t, n, h_c, d_v // h_c)
    rows = (rows * w.to(dtype)[..., None]).reshape(t * n, d_v)
    return torch.zeros(p, d_v, dtype=dtype).index_add_(0, idx.reshape(-1), rows)


# (P, T, n, D_v, h_c, E, PIECE, BLOCK_R, BLOCK_D, HOT_GRID, UNROLL): counts of 0, 1, PIECE - 1,
# PIECE, PIECE + 1, 2 PIECE, 2 PIECE + 1, 7 PIECE + 3 with unselected rows at both ends; small
# BLOCK_R / BLOCK_D so that tiles split rows and straddle MCS cores; HOT_GRID small so that
# the persistent hot-row kernels take several chunks per program
DENSE_CASES = [
    (53, 7, 30, 36, 2, 3, 4, 16, 256, 1024, 2),
    (53, 7, 30, 36, 2, 3, 4, 4, 16, 3, 1),
    (41, 5, 23, 24, 3, 1, 3, 2, 16, 2, 3),
    (97, 11, 29, 20, 1, 2, 5, 8, 16, 5, 2),
    (30, 4, 16, 32, 2, 2, 1, 4, 16, 7, 2),  # column tiles = MCS cores: one weight per row
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "x".join(map(str, c)))
def test_dense_scatter_hot_rows(case, monkeypatch, bwd):
    """``scatter_rows`` on its own: rows selected around the ``DENSE_PIECE``
    boundary (dense loop only / first piece + carries, carries across chunk and program
    boundaries), unselected rows written as zeros, bitwise deterministic; fp64 rule, fp32 and
    (two cases) bf16."""
    p, t, n, d_v, h_c, e, piece, block_r, block_d, grid, unroll = case
    k = bwd
    monkeypatch.setattr(k, "DENSE_PIECE", piece)
    monkeypatch.setattr(k, "DENSE_HOT_GRID", grid)
    monkeypatch.setattr(TUNING, "lookup_dense_tile", (block_r, block_d, 4, unroll))
    g = torch.Generator().manual_seed(p + t)
    counts = [0, 1, piece - 1, piece, piece + 1, 2 * piece, 2 * piece + 1, 7 * piece + 3]
    rows = torch.randperm(p - 2, generator=g)[: len(counts)] + 1  # rows 0 and P-1 unselected
    flat = torch.cat([torch.full((c,), int(r)) for c, r in zip(counts, rows)])
    flat = torch.cat([flat, torch.randint(1, p - 1, (t * n - len(flat),), generator=g)])
    idx = flat[torch.randperm(t * n, generator=g)].view(t, n)
    w = torch.randn(t, n, h_c, generator=g)
    blk = torch.randint(0, e, (t, n), generator=g) if e > 1 else None
    go = torch.randn(t, e, d_v, generator=g)
    ours = k.scatter_rows(p, idx, w, blk, e, go, torch.float32)
    exact = _scatter_ref(p, idx, w, blk, e, go, torch.float64)
    assert_rule(ours, _scatter_ref(p, idx, w, blk, e, go, torch.float32), exact, "dV")
    assert (ours[0] == 0).all() and (ours[-1] == 0).all()
    if block_r == 4:  # same inputs again: bitwise equal; and a bf16 table (the interpreter's
        # fp32 -> bf16 cast truncates, the GPU's rounds to nearest: still within the rule)
        assert torch.equal(ours, k.scatter_rows(p, idx, w, blk, e, go, torch.float32))
        gb = go.bfloat16()
        bf = k.scatter_rows(p, idx, w, blk, e, gb, torch.bfloat16)
        assert bf.dtype == torch.bfloat16
        assert_rule(bf, _scatter_ref(p, idx, w, blk, e, gb, torch.bfloat16),
                    _scatter_ref(p, idx, w, blk, e, gb, torch.float64), "dV bf16")


def test_scatter_rows_edges(bwd):
    """No selections -> zeros of the table's shape."""
    idx = torch.zeros(0, 4, dtype=torch.long)
    w, go = torch.zeros(0, 4, 1), torch.zeros(0, 1, 8)
    dv = bwd.scatter_rows(5, idx, w, None, 1, go, torch.bfloat16)
    assert dv.shape == (5, 8) and dv.dtype == torch.bfloat16 and not dv.any()


def test_two_dim_scores_and_dispatch():
    inputs = _inputs(3, 4, 6, 8, 1, 1, 0, squeeze=True)
    v, idx, s, *_ = inputs
    ours = lookup_reduce(v, idx, s, impl="triton")
    ref = reference.lookup_reduce(v, idx, s)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    s = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(lookup_reduce(v, idx, s, impl="triton").sum(), [s])
    (g_ref,) = torch.autograd.grad(reference.lookup_reduce(v, idx, s).sum(), [s])
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


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


# Forward tile paths of ``_fwd_blocks`` (``Tuning.lookup_fwd_tile``,
# (BLOCK_N, BLOCK_D, warps[, pf, ir, ns, ev, acc]), None = the default tiles of the shape) on small
# shapes: (blocks, (T, n, P, D_v, h_c, E, D_p, activation)). Column tiles inside one MCS core
# (CORE_UNIFORM) and straddling cores, n > 128 with IDX_REGS requested (falls back to 0).
FWD_PATHS = [
    (None, (1, 84, 300, 96, 2, 4, 0, "identity")),  # decode: n128 d32 w8 acc0
    ((16, 128, 4, 0, 0, 1, 0, 0), (3, 40, 50, 72, 2, 3, 0, "identity")),  # medium tiles
    ((8, 16, 2, 1, 0, 1, 0, 0), (2, 19, 30, 40, 2, 4, 5, "gelu")),  # acc0 + pf1
    ((1, 256, 1, 2, 0, 1, 1), (3, 9, 20, 40, 2, 4, 0, "identity")),  # ive: pf2 ev
    ((1, 32, 1, 0, 1, 3), (3, 11, 20, 64, 2, 4, 0, "identity")),  # train: ir1 ns3, uniform cores
    ((4, 32, 1, 1, 2), (4, 33, 40, 48, 1, 1, 0, "identity")),  # pkm: ir2 pf1
    ((4, 64, 2, 2), (3, 10, 20, 24, 1, 1, 7, "gelu")),  # v2: pf2
    ((2, 64, 2, 1), (3, 5, 20, 24, 1, 2, 300, "silu")),  # D_p 300: pre-values by chunks
    ((2, 16, 1, 2, 1, 2), (3, 7, 20, 24, 3, 3, 4, "identity")),  # pf2 ir1 ns2, cores straddle
    ((4, 32, 1, 1, 2), (2, 130, 40, 24, 2, 2, 0, "identity")),  # n > 128: ir falls back to 0
]


@pytest.mark.parametrize("blocks,case", FWD_PATHS, ids=lambda x: str(x).replace(" ", ""))
def test_forward_tile_paths(blocks, case, fwd):
    """The forward kernel at every tile path / switch combination, fp32, against fp64."""
    t, n, p, d_v, h_c, e, d_p, act = case
    v, idx, s, blk, u, q, _ = _inputs(t, n, p, d_v, h_c, e, d_p)
    with tuned(lookup_fwd_tile=blocks):
        ours = fwd.forward(v, idx, s, blk, e, u, q, act)
    same = reference.lookup_reduce(v, idx, s, blk, e, u, q, act)
    u64, q64 = (None, None) if u is None else (u.double(), q.double())
    exact = reference.lookup_reduce(v.double(), idx, s.double(), blk, e, u64, q64, act)
    assert ours.shape == exact.shape
    assert_rule(ours, same, exact, f"out {blocks}")


def test_forward_dtypes(fwd):
    """bf16 table, int32 idx / block, fp16 scores, fp32 output (as the backward's d pre_query);
    on an IDX_REGS path (the packed int32 copy) and the in-order one."""
    v, idx, s, blk, u, q, _ = _inputs(3, 9, 20, 40, 2, 4, 6)
    vb, ub, sh = v.bfloat16(), u.bfloat16(), s.half()
    exact = reference.lookup_reduce(vb.double(), idx, sh.double(), blk, 4, ub.double(),
                                    q.double(), "silu")
    same = reference.lookup_reduce(vb.float(), idx, sh.float(), blk, 4, ub.float(), q, "silu")
    for blocks in ((2, 32, 1, 1, 1), (4, 64, 2, 0, 0, 1, 0, 0)):
        with tuned(lookup_fwd_tile=blocks):
            ours = fwd.forward(vb, idx.int(), sh, blk.int(), 4, ub, q, "silu", torch.float32)
        assert ours.dtype == torch.float32
        assert_rule(ours, same, exact, f"out {blocks}")


def test_fwd_blocks_heuristic(fwd):
    """The tile chosen per shape class (docs/kernels.md): decode / medium keep the previous
    tiles; many tokens get the sweep's winners; the override's short and long forms."""
    k = fwd
    C = k.FwdCfg
    assert k._fwd_blocks(1, 1024, 84, 4) == C(128, 32, 8, acc=0)
    assert k._fwd_blocks(64, 1024, 84, 4) == C(16, 128, 4, acc=0)
    assert k._fwd_blocks(1024, 1024, 84, 4) == C(1, 256, 1, pf=2, ev=1)
    assert k._fwd_blocks(16384, 512, 32, 4) == C(1, 256, 1, ir=1, ns=3)
    assert k._fwd_blocks(16384, 512, 256, 4) == C(1, 256, 1, pf=2)
    assert k._fwd_blocks(4096, 256, 32, 1) == C(4, 256, 1, pf=1, ir=2)
    assert k._fwd_blocks(4096, 384, 32, 1, 128) == C(4, 512, 2, pf=2)
    assert k._fwd_blocks(4096, 384, 32, 1, 300) == C(2, 512, 2, pf=1)
    with tuned(lookup_fwd_tile=(1, 512, 2)):
        assert k._fwd_blocks(8, 384, 32, 1) == C(1, 512, 2)
    with tuned(lookup_fwd_tile=(8, 512, 2, 1, 2, 3, 1, 0)):
        assert k._fwd_blocks(8, 100, 5, 1) == C(8, 128, 2, 1, 2, 3, 1, 0)
    # IDX_REGS needs n <= 128 (the packed copy): requested with n = 130, the launch drops it
    m = dict(device="meta")
    v, s = torch.empty(50, 24, **m), torch.empty(4, 130, 1, **m)
    idx = torch.empty(4, 130, dtype=torch.long, **m)
    for nn, ir in ((130, 0), (100, 2)):
        with tuned(lookup_fwd_tile=(4, 32, 1, 1, 2)):
            _, _, kw = k._fwd_launch(v, idx[:, :nn], s[:, :nn], None, 1, None, None, "identity",
                                     torch.empty(4, 1, 24, **m))
        assert kw["IDX_REGS"] == ir
