"""Retrieval: fused Triton kernels (interpreter on CPU) against the PyTorch reference.

Same selected set and the same per-core scores (ties aside), order by summed score, and
gradients to ``s_row``, ``s_col`` and ``cores`` through the returned scores.

    .venv/bin/python -m pytest tests/ops/test_retrieval.py
"""

from __future__ import annotations

import pytest
import torch

import ultramem.ops.retrieval as rt
from ultramem.ops.retrieval import product_key_topk, reference, tucker_topk

pytestmark = pytest.mark.usefixtures("interpret")

# (lead shape, N, r, h_c, k, m): non-powers of two, k*k over one grid chunk (k=70 -> several)
TUCKER = [
    ((1,), 5, 1, 1, 3, 4),
    ((2, 3), 37, 2, 2, 9, 11),
    ((3,), 100, 2, 1, 16, 20),
    ((2,), 300, 3, 2, 40, 42),
    ((1, 2), 130, 2, 2, 70, 84),
    ((4,), 64, 2, 3, 8, 64),
]
PK = [((1,), 7, 3, 5), ((2, 2), 50, 12, 16), ((3,), 129, 70, 33)]


def _uv(cores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, vh = torch.linalg.svd(cores.sum(0))
    return u[:, 0].contiguous(), vh[0].contiguous()


def _check_selection(s_ref, a_ref, s_ours, a_ours, summed_ref, summed_ours):
    assert a_ours.shape == a_ref.shape and a_ours.dtype == a_ref.dtype
    torch.testing.assert_close(a_ours.sort(-1).values, a_ref.sort(-1).values, rtol=0, atol=0)
    torch.testing.assert_close(s_ours, s_ref, rtol=1e-5, atol=1e-5)
    assert (summed_ours[..., :-1] >= summed_ours[..., 1:] - 1e-6).all()  # descending
    torch.testing.assert_close(summed_ours, summed_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", TUCKER, ids=lambda c: "x".join(map(str, c[1:])))
def test_tucker_topk(case):
    lead, n, r, h_c, k, m = case
    g = torch.Generator().manual_seed(n * 7 + k)
    s_row = torch.randn(*lead, n, r, generator=g)
    s_col = torch.randn(*lead, n, r, generator=g)
    cores = torch.randn(h_c, r, r, generator=g)
    u, v = _uv(cores)
    s_ref, a_ref = reference.tucker_topk(s_row, s_col, cores, u, v, k, m)
    with torch.no_grad():  # kernel-computed scores
        s_k, a_k = tucker_topk(s_row, s_col, cores, u, v, k, m, impl="triton")
    _check_selection(s_ref, a_ref, s_k, a_k, s_ref.sum(-1), s_k.sum(-1))
    leaves = [x.clone().requires_grad_() for x in (s_row, s_col, cores)]
    ours = tucker_topk(*leaves, u, v, k, m, impl="triton")
    w = torch.randn(s_ref.shape, generator=g)
    grads = torch.autograd.grad((ours[0] * w).sum(), leaves)
    leaves_ref = [x.clone().requires_grad_() for x in (s_row, s_col, cores)]
    ref = reference.tucker_topk(*leaves_ref[:2], leaves_ref[2], u, v, k, m)
    # align the reference's order to ours (same set) before weighting
    perm = (ref[1].unsqueeze(-1) == ours[1].unsqueeze(-2)).float().argmax(-2)
    ref_s = ref[0].gather(-2, perm.unsqueeze(-1).expand_as(ref[0]))
    grads_ref = torch.autograd.grad((ref_s * w).sum(), leaves_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", PK, ids=lambda c: "x".join(map(str, c[1:])))
def test_product_key_topk(case):
    lead, n, k, m = case
    g = torch.Generator().manual_seed(n + k)
    s_row = torch.randn(*lead, n, generator=g, requires_grad=True)
    s_col = torch.randn(*lead, n, generator=g, requires_grad=True)
    s_ref, a_ref = reference.product_key_topk(s_row, s_col, k, m)
    s_k, a_k = product_key_topk(s_row, s_col, k, m, impl="triton")
    _check_selection(s_ref, a_ref, s_k, a_k, s_ref, s_k)
    (g_row, g_col) = torch.autograd.grad(s_k.sum(), [s_row, s_col])
    (r_row, r_col) = torch.autograd.grad(s_ref.sum(), [s_row, s_col])
    torch.testing.assert_close(g_row, r_row)
    torch.testing.assert_close(g_col, r_col)
    with torch.no_grad():
        s_k2, _ = product_key_topk(s_row, s_col, k, m, impl="triton")
    torch.testing.assert_close(s_k2, s_ref.detach(), rtol=1e-5, atol=1e-5)


def test_falls_back_without_kernels(monkeypatch):
    s_row, s_col = torch.randn(2, 20, 2), torch.randn(2, 20, 2)
    cores = torch.randn(2, 2, 2)
    u, v = _uv(cores)
    ref = reference.tucker_topk(s_row, s_col, cores, u, v, 5, 6)
    monkeypatch.setattr(rt, "_kernels", None)
    for impl in ("auto", "triton", "torch"):
        out = tucker_topk(s_row, s_col, cores, u, v, 5, 6, impl=impl)
        torch.testing.assert_close(out[0], ref[0])
        assert torch.equal(out[1], ref[1])


@pytest.mark.parametrize("case", [TUCKER[1], TUCKER[4]], ids=["small", "two_chunks"])
def test_phase1_by_torch_topk(case, monkeypatch):
    """Many rows: phase 1 by torch.topk feeding the grid / final kernels, same selection."""
    monkeypatch.setattr(rt._kernels, "PHASE1_KERNEL_MAX_ROWS", 0)
    monkeypatch.setattr(rt._kernels, "P1_CHUNK", 0)
    lead, n, r, h_c, k, m = case
    g = torch.Generator().manual_seed(3)
    s_row, s_col = torch.randn(*lead, n, r, generator=g), torch.randn(*lead, n, r, generator=g)
    cores = torch.randn(h_c, r, r, generator=g)
    u, v = _uv(cores)
    s_ref, a_ref = reference.tucker_topk(s_row, s_col, cores, u, v, k, m)
    s_k, a_k = tucker_topk(s_row, s_col, cores, u, v, k, m, impl="triton")
    _check_selection(s_ref, a_ref, s_k, a_k, s_ref.sum(-1), s_k.sum(-1))
    p_ref, pa_ref = reference.product_key_topk(s_row[..., 0], s_col[..., 0], k, m)
    p_k, pa_k = product_key_topk(s_row[..., 0], s_col[..., 0], k, m, impl="triton")
    _check_selection(p_ref, pa_ref, p_k, pa_k, p_ref, p_k)


# (lead, N, r, h_c, k, m, P1_CHUNK, GRID_CHUNK_SPLIT): chunks short at the end, k = chunk,
# one and several grid splits, N not a multiple of the chunk
SPLIT = [
    ((2, 3), 37, 2, 2, 9, 11, 16, 64),
    ((3,), 100, 2, 1, 16, 20, 16, 128),
    ((2,), 300, 3, 2, 40, 42, 64, 512),
    ((1, 2), 130, 2, 2, 32, 84, 32, 256),
    ((4,), 200, 2, 3, 8, 64, 32, 64),
]


@pytest.mark.parametrize("case", SPLIT, ids=lambda c: "x".join(map(str, c[1:])))
@pytest.mark.parametrize("path", ["split", "one_program", "one_program_grid4096"])
def test_split_phase1(case, path, monkeypatch):
    """Phase 1 split over chunks (stage A) merged in the grid kernel (stage B), and the
    one-program-per-row kernel with a split grid (the default for few rows) and with one grid
    program per row (many rows): same selection and scores as the reference."""
    lead, n, r, h_c, k, m, p1_chunk, gchunk = case
    monkeypatch.setattr(rt._kernels, "P1_CHUNK", p1_chunk if path == "split" else 0)
    monkeypatch.setattr(rt._kernels, "GRID_CHUNK_SPLIT", gchunk)
    monkeypatch.setattr(rt._kernels, "GRID_CHUNK_FEW", gchunk)
    if path == "one_program_grid4096":
        monkeypatch.setattr(rt._kernels, "GRID_FEW_MAX_ROWS", 0)
    g = torch.Generator().manual_seed(n * 3 + k)
    s_row, s_col = torch.randn(*lead, n, r, generator=g), torch.randn(*lead, n, r, generator=g)
    cores = torch.randn(h_c, r, r, generator=g)
    u, v = _uv(cores)
    s_ref, a_ref = reference.tucker_topk(s_row, s_col, cores, u, v, k, m)
    with torch.no_grad():
        s_k, a_k = tucker_topk(s_row, s_col, cores, u, v, k, m, impl="triton")
    _check_selection(s_ref, a_ref, s_k, a_k, s_ref.sum(-1), s_k.sum(-1))
    p_ref, pa_ref = reference.product_key_topk(s_row[..., 0], s_col[..., 0], k, min(m, k * k))
    p_k, pa_k = product_key_topk(s_row[..., 0], s_col[..., 0], k, min(m, k * k), impl="triton")
    _check_selection(p_ref, pa_ref, p_k, pa_k, p_ref, p_k)


def _stable_topk_oracle(p_row, p_col, exact, k, m):
    """Phase 1 by a stable descending sort (ties to the lower key id, as the kernels break
    them), then the top-m exact grid scores as a sorted list (a tie-invariant multiset)."""
    ia = torch.sort(p_row, dim=-1, descending=True, stable=True).indices[..., :k]
    ib = torch.sort(p_col, dim=-1, descending=True, stable=True).indices[..., :k]
    grid = exact(ia, ib)  # [..., k, k]
    return grid.flatten(-2).sort(-1, descending=True).values[..., :m]


@pytest.mark.parametrize("bound", [True, False], ids=["bound", "radix32"])
@pytest.mark.parametrize("lead,n,k,m", [((3,), 40, 7, 9), ((2,), 300, 42, 42), ((1,), 64, 64, 100)])
def test_selection_with_heavy_ties(lead, n, k, m, bound, monkeypatch):
    """Scores from a handful of values: every selection ties at its threshold, so neither the
    lower bound's prefix nor the early exit can finish early and the tie path decides. The
    selected scores must equal a stable-sort oracle's, addresses must be distinct and in
    range, and each returned per-core score must be the exact score of its address."""
    monkeypatch.setattr(rt._kernels, "SELECT_BOUND", bound)
    g = torch.Generator().manual_seed(n + k + m)
    s_row = torch.randint(-1, 2, (*lead, n, 2), generator=g).float()
    s_col = torch.randint(-1, 2, (*lead, n, 2), generator=g).float()
    cores = torch.randint(-2, 3, (2, 2, 2), generator=g).float()
    u, v = torch.tensor([1.0, 0.5]), torch.tensor([0.5, 1.0])
    with torch.no_grad():
        s_k, a_k = tucker_topk(s_row, s_col, cores, u, v, k, m, impl="triton")

    def exact(ia, ib):
        ra = s_row.gather(-2, ia.unsqueeze(-1).expand(*ia.shape, 2))
        cb = s_col.gather(-2, ib.unsqueeze(-1).expand(*ib.shape, 2))
        return torch.einsum("...ar,crs,...bs->...ab", ra, cores, cb)

    want = _stable_topk_oracle(s_row @ u, s_col @ v, exact, k, m)
    torch.testing.assert_close(s_k.sum(-1).sort(-1, descending=True).values, want)
    assert (a_k >= 0).all() and (a_k < n * n).all()
    assert (a_k.sort(-1).values.diff(dim=-1) > 0).all()  # distinct addresses
    ra = s_row.gather(-2, (a_k // n).unsqueeze(-1).expand(*a_k.shape, 2))
    cb = s_col.gather(-2, (a_k % n).unsqueeze(-1).expand(*a_k.shape, 2))
    torch.testing.assert_close(s_k, torch.einsum("...mr,crs,...ms->...mc", ra, cores, cb))
    # product keys (sum mode) on the same tie-heavy scores
    p_k, pa_k = product_key_topk(s_row[..., 0], s_col[..., 0], k, m, impl="triton")
    want_pk = _stable_topk_oracle(s_row[..., 0], s_col[..., 0],
                                  lambda ia, ib: s_row[..., 0].gather(-1, ia)[..., :, None]
                                  + s_col[..., 0].gather(-1, ib)[..., None, :], k, m)
    torch.testing.assert_close(p_k.sort(-1, descending=True).values, want_pk)
    assert (pa_k.sort(-1).values.diff(dim=-1) > 0).all()


@pytest.mark.parametrize("n_sq,num_rows,shape", [(36, 9, (1, 5)), (144, 36, (3, 2, 7)), (10000, 2500, (4, 300))])
def test_ive_address_matches_reference(n_sq, num_rows, shape):
    g = torch.Generator().manual_seed(n_sq)
    perm = torch.randperm(n_sq, generator=g).to(torch.int32)
    addr = torch.randint(0, n_sq, shape, generator=g)
    addr[..., 0] = addr[..., -1]  # duplicates
    rows, blk = rt.ive_address(addr, perm, num_rows, impl="triton")
    ref_rows, ref_blk = reference.ive_address(addr, perm, num_rows)
    assert rows.dtype == blk.dtype == torch.int64 and rows.shape == addr.shape
    assert torch.equal(rows, ref_rows) and torch.equal(blk, ref_blk)
    assert torch.equal(blk * num_rows + rows, perm[addr].long())
