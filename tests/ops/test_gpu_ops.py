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

import ultramem.ops.lookup_reduce as lr
from ultramem.ops.lookup_reduce import lookup_reduce
from ultramem.ops.retrieval import product_key_topk, reference, tucker_topk

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


@pytest.mark.parametrize("method", ["dense", "sort", "atomic"])
@pytest.mark.parametrize("case", LR_CASES, ids=lambda c: "x".join(map(str, c)))
def test_lookup_reduce_bf16(case, method, monkeypatch):
    monkeypatch.setattr(lr, "DV_METHOD", method)
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
    """The dense value gradient under skewed indices (u^4: rows picked up to thousands of times,
    through the chunk carries), bf16: within the rule against the fp64 ``index_add_``, bitwise
    deterministic, and equal to the sort method's up to bf16 rounding."""
    t, n, p, d_v, h_c, e = case
    k = lr._kernels
    monkeypatch.setattr(k, "DENSE_PIECE", piece)
    g = torch.Generator(device="cuda").manual_seed(p)
    kw = dict(device="cuda", generator=g)
    idx = ((torch.rand(t, n, **kw) ** 4 * p).long() * 2654435761) % p
    w = torch.randn(t, n, h_c, **kw)
    blk = torch.randint(0, e, (t, n), **kw) if e > 1 else None
    go = torch.randn(t, e, d_v, **kw).bfloat16()
    ours = k.scatter_rows(p, idx, w, blk, e, go, torch.bfloat16, "dense")
    assert torch.equal(ours, k.scatter_rows(p, idx, w, blk, e, go, torch.bfloat16, "dense"))
    exact = _scatter_ref(p, idx, w, blk, e, go, torch.float64)
    same = _scatter_ref(p, idx, w, blk, e, go, torch.bfloat16)
    err = (ours.double() - exact).abs().max().item()
    base = (same.double() - exact).abs().max().item()
    assert err <= 2 * base + 1e-6 * exact.abs().max().item(), f"{err:.3g} vs {base:.3g}"
    # fp32 accumulation, one rounding: within one bf16 ulp of the fp32 sum
    f32 = _scatter_ref(p, idx, w, blk, e, go, torch.float32)
    torch.testing.assert_close(ours.float(), f32, rtol=2**-7, atol=1e-5)
    srt = k.scatter_rows(p, idx, w, blk, e, go, torch.bfloat16, "sort")
    torch.testing.assert_close(ours.float(), srt.float(), rtol=2**-7, atol=1e-5)


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
    sr = s_row.clone().requires_grad_()
    sc, c = s_col.clone().requires_grad_(), cores.clone().requires_grad_()
    out, _ = tucker_topk(sr, sc, c, u, v, k, m, impl="triton")
    out.float().sum().backward()
    assert sr.grad is not None and sc.grad is not None and c.grad is not None
    s_pk, a_pk = product_key_topk(s_row[..., 0], s_col[..., 0], k, m, impl="triton")
    p_ref, pa_ref = reference.product_key_topk(s_row[..., 0].float(), s_col[..., 0].float(), k, m)
    torch.testing.assert_close(s_pk.float().sort(-1).values, p_ref.sort(-1).values, rtol=tol, atol=tol)


# ---- key scores (ultramem.ops.key_scores): the 1.6B-x12 decode shape --------------------------
@pytest.mark.parametrize("blocks", [None, "16,1,4", "128,64,8,32"])
@pytest.mark.parametrize("t", [1, 4, 16, 64])
def test_key_scores_decode_bf16(t, blocks, monkeypatch):
    """``q [T, 1, 2, 1, 448]`` shared by 2 heads, ``keys [2, 2, 3584, 2, 448]``, LayerNorm with
    affine, bf16: the kernel within the rule against the fp64 reference, on its default tiles
    and two others (multiply + row sum; 128-row tl.dot); PDL on at the default tiles."""
    import ultramem.ops.key_scores as ks  # here: the CPU tests import it for the interpreter

    monkeypatch.setattr(ks._kernels, "BLOCKS", blocks)
    monkeypatch.setattr(ks._kernels, "USE_KERNEL", True)  # off by default (slower on H200)
    g = torch.Generator(device="cuda").manual_seed(t)
    kw = dict(device="cuda", generator=g)
    q = (torch.randn(t, 1, 2, 1, 448, **kw) + 0.3).bfloat16()
    keys = (torch.randn(2, 2, 3584, 2, 448, **kw) / 448**0.5).bfloat16()
    w = (1 + 0.2 * torch.randn(448, **kw)).bfloat16()
    b = (0.2 * torch.randn(448, **kw)).bfloat16()
    same = ks.reference.key_scores(q, keys, "layernorm", w, b)
    exact = ks.reference.key_scores(q.double(), keys.double(), "layernorm", w.double(), b.double())
    calls = []
    monkeypatch.setattr(ks._kernels, "key_scores",
                        lambda *a, _f=ks._kernels.key_scores: calls.append(1) or _f(*a))
    for pdl in (False, True) if blocks is None else (False,):
        monkeypatch.setattr(ks._kernels, "USE_PDL", pdl)
        ours = ks.key_scores(q, keys, "layernorm", w, b, impl="auto")
        assert calls, "the kernel did not run"
        for o, s_, x in zip(ours, same, exact):
            assert o.shape == (1, t, 2, 3584, 2) and o.dtype == torch.bfloat16 and o.is_contiguous()
            err = (o.double() - x).abs().max().item()
            base = (s_.double() - x).abs().max().item()
            assert err <= 2 * base + 1e-6 * x.abs().max().item(), f"pdl {pdl}: {err:.3g} vs {base:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 2, 5, 8])
@pytest.mark.parametrize("n,k", [(896, 2048), (2048, 4096)])
def test_skinny_linear_decode_bf16(b, n, k, monkeypatch):
    """The decode projections of the 1.6B-x12 layer in bf16: the kernel within twice the error
    of cuBLAS's ``F.linear`` against fp64 (plus one bf16 ulp for the output rounding)."""
    import ultramem.ops.skinny_linear as sl

    monkeypatch.setattr(sl._kernels, "MAX_ROWS", sl._kernels.KERNEL_MAX_ROWS)  # default: 1 row
    g = torch.Generator(device="cuda").manual_seed(b * n)
    x = torch.randn(b, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).bfloat16()
    assert sl.triton_available(x, w) and b <= sl._kernels.MAX_ROWS  # the kernel path
    with torch.no_grad():
        ours = sl.skinny_linear(x, w, impl="auto")
    exact = x.double() @ w.double().T
    base = (F.linear(x, w).double() - exact).abs().max().item()
    err = (ours.double() - exact).abs().max().item()
    assert err <= 2 * base + exact.abs().max().item() * 2**-8, (err, base)


def _uv_gpu(cores):
    uu, _, vh = torch.linalg.svd(cores.sum(0))
    return uu[:, 0].contiguous(), vh[0].contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [2, 8, 128])
def test_fused_retrieval_gpu(rows, dtype, monkeypatch):
    """The one-launch fused kernel at the 1.6B decode size (rows = B x 2 heads, N 3584, r 2,
    h_c 2, k 42, m 42, the IVE map with P = N^2 / 4): against the reference on the fp32-upcast
    inputs (summed scores as sorted lists, >= 99 % of addresses), the address map exactly,
    and against the three-launch path (same addresses and scores up to rounding)."""
    import ultramem.ops.retrieval.triton as rtk

    n, r, h_c, k, m = 3584, 2, 2, 42, 42
    p = n * n // 4
    monkeypatch.setattr(rtk, "FUSED_MAX_ROWS", 256)  # off by default (slower on H200)
    assert rtk._fused_applies(rows, n, k, m)
    g = torch.Generator(device="cuda").manual_seed(rows)
    s_row = torch.randn(rows, n, r, device="cuda", generator=g).to(dtype)
    s_col = torch.randn(rows, n, r, device="cuda", generator=g).to(dtype)
    cores = torch.randn(h_c, r, r, device="cuda", generator=g)
    u, v = _uv_gpu(cores)
    perm = torch.randperm(n * n, device="cuda", generator=g).to(torch.int32)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    s_ref, a_ref = reference.tucker_topk(s_row.float(), s_col.float(), cores, u, v, k, m)
    fused = rtk.topk_ive(s_row, s_col, cores, u, v, k, m, False, perm, p, path="fused")
    three = rtk.topk_ive(s_row, s_col, cores, u, v, k, m, False, perm, p, path="launches")
    for s_k, a_k in ((fused[0], fused[1]), (three[0], three[1])):
        torch.testing.assert_close(s_k.float().sum(-1).sort(-1).values,
                                   s_ref.sum(-1).sort(-1).values, rtol=tol, atol=tol)
        same = (a_k.sort(-1).values == a_ref.sort(-1).values).float().mean().item()
        assert same >= 0.99, f"selected set differs in {1 - same:.3%} of slots"
    same = (fused[1].sort(-1).values == three[1].sort(-1).values).float().mean().item()
    assert same >= 0.99, f"fused vs launches: {1 - same:.3%} of slots differ"
    r_ref, b_ref = reference.ive_address(fused[1], perm, p)
    assert torch.equal(fused[2], r_ref) and torch.equal(fused[3], b_ref)
    assert torch.equal(three[2], reference.ive_address(three[1], perm, p)[0])
    # product keys
    pk = rtk.topk(s_row[..., 0].contiguous(), s_col[..., 0].contiguous(), None, None, None, k, m,
                  True, path="fused")
    p_ref, _ = reference.product_key_topk(s_row[..., 0].float(), s_col[..., 0].float(), k, m)
    torch.testing.assert_close(pk[0].float().sort(-1).values, p_ref.sort(-1).values, rtol=tol,
                               atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_phase1_two_pieces_gpu(dtype, monkeypatch):
    """Phase 1 at the 151M training size (32 K rows, N 2200 in two pieces 2048 + 256, k 16):
    exactly the one-block kernel's selection (same scores, same tie rule), and the whole
    three-launch retrieval (m 16) against the reference."""
    import ultramem.ops.retrieval.triton as rtk

    rows, n, r, h_c, k, m = 32768, 2200, 2, 2, 16, 16
    assert rtk._pieces(n, k, True) == (2048, 256)
    g = torch.Generator(device="cuda").manual_seed(7)
    s_row = torch.randn(rows, n, r, device="cuda", generator=g).to(dtype)
    s_col = torch.randn(rows, n, r, device="cuda", generator=g).to(dtype)
    cores = torch.randn(h_c, r, r, device="cuda", generator=g)
    u, v = _uv_gpu(cores)
    monkeypatch.setattr(rtk, "PHASE1_SPLIT_BLOCK", True)
    two = rtk.phase1_select(s_row, s_col, u, v, k, False)
    s_k, a_k = rtk.topk(s_row, s_col, cores, u, v, k, m, False, path="launches")
    monkeypatch.setattr(rtk, "PHASE1_SPLIT_BLOCK", False)
    one = rtk.phase1_select(s_row, s_col, u, v, k, False)
    assert torch.equal(two.sort(-1).values, one.sort(-1).values)
    s_ref, a_ref = reference.tucker_topk(s_row.float(), s_col.float(), cores, u, v, k, m)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(s_k.float().sum(-1).sort(-1).values, s_ref.sum(-1).sort(-1).values,
                               rtol=tol, atol=tol)
    same = (a_k.sort(-1).values == a_ref.sort(-1).values).float().mean().item()
    assert same >= 0.99, f"selected set differs in {1 - same:.3%} of slots"
