"""The op checks on a CUDA device, compiled kernels, bf16 tables (skipped without a GPU).

Same rule as the CPU tests: the kernel's error against an fp64 reference is at most about twice
the same-dtype (bf16) PyTorch reference's error. Retrieval: the kernel (fp32 inside) selects the
same set as the reference run on the fp32-upcast inputs.

    PYTHONPATH=. python3 -m pytest tests/ops/test_gpu_ops.py -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ultramem.ops.lookup_reduce import lookup_reduce
from ultramem.ops.retrieval import ive_address, product_key_topk, reference, ring_address, tucker_topk
from ultramem.ops.tuning import tuned

pytestmark = pytest.mark.gpu

LR_CASES = [  # (T, n, P, D_v, h_c, E, D_p, activation)
    (1, 84, 1000, 1024, 2, 4, 0, "identity"),
    (64, 84, 5000, 1024, 2, 4, 0, "identity"),
    (300, 32, 700, 256, 1, 1, 0, "identity"),
    (257, 33, 4093, 384, 3, 1, 128, "gelu"),
    (129, 32, 999, 192, 2, 2, 64, "silu"),
    (1000, 16, 50000, 512, 2, 4, 0, "identity"),
    (1000, 16, 50, 256, 2, 2, 0, "identity"),  # ~320 picks a row: hot rows staged in fp32
]


def _run(inputs, e, act, dtype):
    v, idx, s, blk, u, q, gy = inputs
    impl = "torch" if dtype == torch.float64 else dtype[1]
    dt = dtype if dtype == torch.float64 else dtype[0]
    leaves = [x.detach().to(dt).requires_grad_() if x is not None else None for x in (v, s, u, q)]
    out = lookup_reduce(leaves[0], idx, leaves[1], blk, e, leaves[2], leaves[3], act, impl=impl)
    wrt = [x for x in leaves if x is not None]
    return [out, *torch.autograd.grad(out, wrt, gy.to(out.dtype))]


@pytest.mark.parametrize("case", LR_CASES, ids=lambda c: "x".join(map(str, c)))
def test_lookup_reduce_bf16(case):
    t, n, p, d_v, h_c, e, d_p, act = case
    g = torch.Generator(device="cuda").manual_seed(t + n + p)
    kw = dict(device="cuda", generator=g)
    inputs = (
        torch.randn(p, d_v, **kw).bfloat16().float(),
        torch.randint(0, p, (t, n), **kw),
        torch.randn(t, n, h_c, **kw).bfloat16().float(),
        torch.randint(0, e, (t, n), **kw) if e > 1 else None,
        torch.randn(p, d_p, **kw).bfloat16().float() if d_p else None,
        torch.randn(t, d_p, **kw).bfloat16().float() if d_p else None,
        torch.randn(t, e, d_v, **kw).bfloat16().float(),
    )
    ours = _run(inputs, e, act, (torch.bfloat16, "triton"))
    same = _run(inputs, e, act, (torch.bfloat16, "torch"))
    exact = _run(inputs, e, act, torch.float64)
    for o, s_, x, name in zip(ours, same, exact, ["out", "dV", "dS", "dU", "dQ"]):
        err = (o.double() - x).abs().max().item()
        base = (s_.double() - x).abs().max().item()
        assert err <= 2 * base + 1e-6 * x.abs().max().item(), f"{name}: {err:.3g} vs {base:.3g}"


def _scatter_ref(p, idx, w, blk, e, go, dtype):
    """``scatter_rows`` in PyTorch (``index_add_``), accumulated in ``dtype``."""
    t, n = idx.shape
    h_c, d_v = w.shape[-1], go.shape[-1]
    b = blk if e > 1 else torch.zeros_like(idx)
    rows = go.to(dtype)[torch.arange(t, device=idx.device)[:, None], b]
    rows = (rows.view(t, n, h_c, d_v // h_c) * w.to(dtype)[..., None]).reshape(t * n, d_v)
    return torch.zeros(p, d_v, device=idx.device, dtype=dtype).index_add_(0, idx.reshape(-1), rows)


@pytest.mark.parametrize("piece", [32, 5])
@pytest.mark.parametrize("case", [(4096, 32, 1 << 20, 256, 1, 1), (2048, 32, 100_000, 512, 2, 4),
                                  (999, 33, 77_777, 384, 3, 1)], ids=["pkm256", "ive4", "odd"])
def test_dense_scatter_skewed(case, piece, monkeypatch):
    """The value gradient under skewed indices (u^4: rows picked up to thousands of times,
    through the chunk carries), bf16: within the rule against the fp64 ``index_add_``, bitwise
    deterministic, and within one bf16 ulp of the fp32 sum."""
    import ultramem.ops.lookup_reduce.triton_backward as k

    t, n, p, d_v, h_c, e = case
    monkeypatch.setattr(k, "DENSE_PIECE", piece)
    g = torch.Generator(device="cuda").manual_seed(p)
    kw = dict(device="cuda", generator=g)
    idx = ((torch.rand(t, n, **kw) ** 4 * p).long() * 2654435761) % p
    w = torch.randn(t, n, h_c, **kw)
    blk = torch.randint(0, e, (t, n), **kw) if e > 1 else None
    go = torch.randn(t, e, d_v, **kw).bfloat16()
    ours = k.scatter_rows(p, idx, w, blk, e, go, torch.bfloat16)
    assert torch.equal(ours, k.scatter_rows(p, idx, w, blk, e, go, torch.bfloat16))
    exact = _scatter_ref(p, idx, w, blk, e, go, torch.float64)
    same = _scatter_ref(p, idx, w, blk, e, go, torch.bfloat16)
    err = (ours.double() - exact).abs().max().item()
    base = (same.double() - exact).abs().max().item()
    assert err <= 2 * base + 1e-6 * exact.abs().max().item(), f"{err:.3g} vs {base:.3g}"
    # fp32 accumulation, one rounding: within one bf16 ulp of the fp32 sum
    f32 = _scatter_ref(p, idx, w, blk, e, go, torch.float32)
    torch.testing.assert_close(ours.float(), f32, rtol=2**-7, atol=1e-5)


def _check_tucker_grads(s_row, s_col, cores, u, v, k, m, tol):
    """Gradients through the kernel's selection (sum of the selected per-core scores) against
    the reference's on the fp32-upcast inputs, row by row where both selected the same set
    (ties may differ in bf16; at least 95 % of rows must agree), and the cores' gradient
    against its fp64 formula ``sum over selected (a, b) of s_row[a] s_col[b]^T`` on our
    addresses."""
    n, r = s_row.shape[-2:]
    leaves = [x.clone().requires_grad_() for x in (s_row, s_col, cores)]
    out, addr = tucker_topk(*leaves, u, v, k, m, impl="triton")
    got = torch.autograd.grad(out.float().sum(), leaves)
    ref_leaves = [x.float().clone().requires_grad_() for x in (s_row, s_col, cores)]
    ref, ref_addr = reference.tucker_topk(*ref_leaves, u, v, k, m)
    want = torch.autograd.grad(ref.sum(), ref_leaves)
    same = (addr.sort(-1).values == ref_addr.sort(-1).values).all(-1).reshape(-1)  # [rows]
    assert same.float().mean() >= 0.95, f"{(~same).sum()} rows select another set"
    for g, w_ in zip(got[:2], want[:2]):
        g, w_ = g.float().reshape(-1, n, r)[same], w_.reshape(-1, n, r)[same]
        assert w_.abs().max() > 0
        torch.testing.assert_close(g, w_, rtol=tol, atol=tol * w_.abs().max().item())
    a2 = addr.reshape(-1, m)
    rows = s_row.double().reshape(-1, n, r).gather(1, (a2 // n)[..., None].expand(-1, -1, r))
    cols = s_col.double().reshape(-1, n, r).gather(1, (a2 % n)[..., None].expand(-1, -1, r))
    d_core = torch.einsum("xmr,xms->rs", rows, cols).expand(cores.shape[0], r, r)
    torch.testing.assert_close(got[2].double(), d_core, rtol=tol, atol=tol * d_core.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [((1, 2), 3584, 2, 2, 42, 42), ((64, 2), 3584, 2, 2, 42, 42),
                                  ((33, 2), 2200, 2, 2, 16, 16), ((5,), 1000, 3, 1, 100, 128)])
def test_tucker_topk_gpu(case, dtype):
    lead, n, r, h_c, k, m = case
    g = torch.Generator(device="cuda").manual_seed(n + k)
    s_row = torch.randn(*lead, n, r, device="cuda", generator=g).to(dtype)
    s_col = torch.randn(*lead, n, r, device="cuda", generator=g).to(dtype)
    cores = torch.randn(h_c, r, r, device="cuda", generator=g)
    uu, _, vh = torch.linalg.svd(cores.sum(0))
    u, v = uu[:, 0].contiguous(), vh[0].contiguous()
    s_ref, a_ref = reference.tucker_topk(s_row.float(), s_col.float(), cores, u, v, k, m)
    with torch.no_grad():
        s_k, a_k = tucker_topk(s_row, s_col, cores, u, v, k, m, impl="triton")
    # tie-robust: the selected summed scores agree as sorted lists; addresses agree almost always
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # scores come back in the input dtype
    torch.testing.assert_close(s_k.float().sum(-1).sort(-1).values, s_ref.sum(-1).sort(-1).values,
                               rtol=tol, atol=tol)
    same = (a_k.sort(-1).values == a_ref.sort(-1).values).float().mean().item()
    assert same >= 0.99, f"selected set differs in {1 - same:.3%} of slots"
    _check_tucker_grads(s_row, s_col, cores, u, v, k, m, tol)
    s_pk, a_pk = product_key_topk(s_row[..., 0], s_col[..., 0], k, m, impl="triton")
    p_ref, pa_ref = reference.product_key_topk(s_row[..., 0].float(), s_col[..., 0].float(), k, m)
    torch.testing.assert_close(s_pk.float().sort(-1).values, p_ref.sort(-1).values, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 2, 5, 8])
@pytest.mark.parametrize("n,k", [(896, 2048), (2048, 4096), (2048, 8192)])
def test_skinny_linear_decode_bf16(b, n, k, monkeypatch):
    """The decode projections of the 1.6B-x12 layer and dense-1.6b's down projection in bf16:
    the kernel within twice the error of cuBLAS's ``F.linear`` against fp64 (plus one bf16 ulp
    for the output rounding)."""
    import ultramem.ops.skinny_linear as sl
    import ultramem.ops.skinny_linear.triton as slk

    g = torch.Generator(device="cuda").manual_seed(b * n)
    x = torch.randn(b, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).bfloat16()
    calls = []
    monkeypatch.setattr(slk, "skinny_linear", lambda *a, _f=slk.skinny_linear: calls.append(1) or _f(*a))
    with torch.no_grad(), tuned(skinny_linear_max_rows=sl.KERNEL_MAX_ROWS):  # default: 1 row
        ours = sl.skinny_linear(x, w, impl="auto")
    assert calls, "the kernel did not run"
    exact = x.double() @ w.double().T
    base = (F.linear(x, w).double() - exact).abs().max().item()
    err = (ours.double() - exact).abs().max().item()
    assert err <= 2 * base + exact.abs().max().item() * 2**-8, (err, base)


def _uv_gpu(cores):
    uu, _, vh = torch.linalg.svd(cores.sum(0))
    return uu[:, 0].contiguous(), vh[0].contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [2, 8, 128])
def test_retrieval_decode_gpu(rows, dtype):
    """Retrieval at the 1.6B decode size (rows = B x 2 heads, N 3584, r 2, h_c 2, k 42, m 42)
    and the IVE map (P = N^2 / 4): against the reference on the fp32-upcast inputs (summed
    scores as sorted lists, >= 99 % of addresses), the address map exactly, product keys."""
    n, r, h_c, k, m = 3584, 2, 2, 42, 42
    p = n * n // 4
    g = torch.Generator(device="cuda").manual_seed(rows)
    s_row = torch.randn(rows, n, r, device="cuda", generator=g).to(dtype)
    s_col = torch.randn(rows, n, r, device="cuda", generator=g).to(dtype)
    cores = torch.randn(h_c, r, r, device="cuda", generator=g)
    u, v = _uv_gpu(cores)
    perm = torch.randperm(n * n, device="cuda", generator=g).to(torch.int32)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    s_ref, a_ref = reference.tucker_topk(s_row.float(), s_col.float(), cores, u, v, k, m)
    with torch.no_grad():
        s_k, a_k = tucker_topk(s_row, s_col, cores, u, v, k, m, impl="triton")
        rows_k, blk_k = ive_address(a_k, perm, p, impl="triton")
    torch.testing.assert_close(s_k.float().sum(-1).sort(-1).values, s_ref.sum(-1).sort(-1).values,
                               rtol=tol, atol=tol)
    same = (a_k.sort(-1).values == a_ref.sort(-1).values).float().mean().item()
    assert same >= 0.99, f"selected set differs in {1 - same:.3%} of slots"
    r_ref, b_ref = reference.ive_address(a_k, perm, p)
    assert torch.equal(rows_k, r_ref) and torch.equal(blk_k, b_ref)
    for table, off in ((None, p // 3), (perm, -(p // 5))):  # V2's ring map, forward and centred
        offset = torch.tensor(off, device="cuda")
        got = ring_address(a_k, table, p // 2, offset, p, impl="triton")
        want = reference.ring_address(a_k, table, p // 2, offset, p)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with torch.no_grad():
        pk, _ = product_key_topk(s_row[..., 0], s_col[..., 0], k, m, impl="triton")
    p_ref, _ = reference.product_key_topk(s_row[..., 0].float(), s_col[..., 0].float(), k, m)
    torch.testing.assert_close(pk.float().sort(-1).values, p_ref.sort(-1).values, rtol=tol,
                               atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_phase1_two_pieces_gpu(dtype, monkeypatch):
    """Phase 1 at the 151M training size (32 K rows, N 2200 in two pieces 2048 + 256, k 16):
    exactly the one-block kernel's selection (same scores, same tie rule), and the whole
    three-launch retrieval (m 16) against the reference."""
    import ultramem.ops.retrieval.triton as rtk

    rows, n, r, h_c, k, m = 32768, 2200, 2, 2, 16, 16
    assert rtk._pieces(n, k) == (2048, 256)
    g = torch.Generator(device="cuda").manual_seed(7)
    s_row = torch.randn(rows, n, r, device="cuda", generator=g).to(dtype)
    s_col = torch.randn(rows, n, r, device="cuda", generator=g).to(dtype)
    cores = torch.randn(h_c, r, r, device="cuda", generator=g)
    u, v = _uv_gpu(cores)
    two = rtk.phase1_select(s_row, s_col, u, v, k, False)
    s_k, a_k = rtk.topk(s_row, s_col, cores, u, v, k, m, False)
    monkeypatch.setattr(rtk, "SPLIT_MIN_SAVING", 1.0)  # no split saves everything: one block
    assert rtk._pieces(n, k) == (4096, 0)
    one = rtk.phase1_select(s_row, s_col, u, v, k, False)
    assert torch.equal(two.sort(-1).values, one.sort(-1).values)
    s_ref, a_ref = reference.tucker_topk(s_row.float(), s_col.float(), cores, u, v, k, m)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(s_k.float().sum(-1).sort(-1).values, s_ref.sum(-1).sort(-1).values,
                               rtol=tol, atol=tol)
    same = (a_k.sort(-1).values == a_ref.sort(-1).values).float().mean().item()
    assert same >= 0.99, f"selected set differs in {1 - same:.3%} of slots"
