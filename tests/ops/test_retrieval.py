"""Retrieval: fused Triton kernels (interpreter on CPU) against the PyTorch reference.

Same selected set and the same per-core scores (ties aside), order by summed score, and
gradients to ``s_row``, ``s_col`` and ``cores`` through the returned scores. Few rows take the
one-launch fused kernel by default (``FUSED_MAX_ROWS``); tests of the three-launch path set
``FUSED_MAX_ROWS = 0`` or call the host functions with ``path="launches"``, and the fused and
three-launch paths are checked against each other (same set, same order, same scores).

    .venv/bin/python -m pytest tests/ops/test_retrieval.py
"""

from __future__ import annotations

import collections

import pytest
import torch

import ultramem.ops.retrieval as rt
from ultramem.ops.retrieval import product_key_topk, reference, tucker_topk

pytestmark = pytest.mark.usefixtures("interpret")


@pytest.fixture(autouse=True)
def _fused_on(monkeypatch):
    """The fused one-launch path is off by default (slower on H200); these tests turn it on up
    to 256 rows, and set FUSED_MAX_ROWS = 0 where they test the three launches."""
    if rt._kernels is not None:
        monkeypatch.setattr(rt._kernels, "FUSED_MAX_ROWS", 256)

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


class _Counted:
    """A kernel whose launches (``kernel[grid](...)``) are counted into ``counts[name]``."""

    def __init__(self, kernel, name, counts):
        self.kernel, self.name, self.counts = kernel, name, counts

    def __getitem__(self, grid):
        self.counts[self.name] += 1
        return self.kernel[grid]


def _count_launches(monkeypatch) -> collections.Counter:
    """Count the retrieval kernels' launches (the host functions look them up per call)."""
    counts = collections.Counter()
    for name in ("_fused_kernel", "_phase1_kernel", "_grid_kernel", "_final_kernel", "_ive_kernel"):
        monkeypatch.setattr(rt._kernels, name, _Counted(getattr(rt._kernels, name), name, counts))
    return counts


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
    monkeypatch.setattr(rt._kernels, "FUSED_MAX_ROWS", 0)  # the three-launch path
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
    monkeypatch.setattr(rt._kernels, "FUSED_MAX_ROWS", 0)  # the three-launch path
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


@pytest.mark.parametrize("lead,n,k,m,bound,path", [
    *[(*c, b, "fused") for c in [((3,), 40, 7, 9), ((2,), 300, 42, 42), ((1,), 64, 64, 100)]
      for b in (True, False)],
    ((2,), 300, 42, 42, True, "launches"),
], ids=lambda x: str(x) if not isinstance(x, tuple) else "x".join(map(str, x)))
def test_selection_with_heavy_ties(lead, n, k, m, bound, path, monkeypatch):
    """Scores from a handful of values: every selection ties at its threshold, so neither the
    lower bound's prefix nor the early exit can finish early and the tie path decides. The
    selected scores must equal a stable-sort oracle's, addresses must be distinct and in
    range, and each returned per-core score must be the exact score of its address. On the
    fused kernel (the default for few rows; N 40 and 300 with both sides' keys in two pieces)
    and on the three launches (N 40 and 300 with phase 1 in two pieces)."""
    monkeypatch.setattr(rt._kernels, "SELECT_BOUND", bound)
    launches = _count_launches(monkeypatch)
    if path == "launches":
        monkeypatch.setattr(rt._kernels, "FUSED_MAX_ROWS", 0)
    else:
        monkeypatch.setattr(rt._kernels, "FUSED_SPLIT_BLOCK", True)
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
    assert launches["_fused_kernel"] == (2 if path == "fused" else 0)
    assert launches["_final_kernel"] == (0 if path == "fused" else 2)


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


# (lead, N, r, h_c, k, m, split) on the fused kernel: k*k not a power of two, m from 1 to k*k,
# N not a power of two (37, 130, 300, 600: with split, both the fused kernel and the three-launch
# phase 1 hold the keys in two pieces, the second partly masked; 5, 100: one masked block) and a
# power of two, the grid tile from 4x4 to 64x64 (its limit), r and h_c 1-3
FUSED = [
    ((1,), 5, 1, 1, 3, 4, False),
    ((1, 3), 37, 2, 2, 9, 11, True),
    ((3,), 100, 3, 3, 16, 1, False),
    ((2,), 300, 2, 2, 42, 42, True),
    ((1,), 130, 1, 2, 11, 121, True),
    ((2,), 64, 2, 1, 8, 64, False),
    ((1,), 600, 2, 3, 64, 100, True),
]


def _tucker_inputs(lead, n, r, h_c, seed):
    g = torch.Generator().manual_seed(seed)
    s_row, s_col = torch.randn(*lead, n, r, generator=g), torch.randn(*lead, n, r, generator=g)
    cores = torch.randn(h_c, r, r, generator=g)
    return s_row, s_col, cores, g


def _host(fn, s_row, s_col, cores, u, v, k, m, sum_mode, *extra, path):
    """A host function of the kernel module on ``[rows, N(, r)]`` views of lead-shaped inputs."""
    n = s_row.shape[-1] if sum_mode else s_row.shape[-2]
    shape = (-1, n) if sum_mode else (-1, n, s_row.shape[-1])
    return fn(s_row.reshape(shape).contiguous(), s_col.reshape(shape).contiguous(), cores, u, v,
              k, m, sum_mode, *extra, path=path)


@pytest.mark.parametrize("case", FUSED,
                         ids=lambda c: "x".join(map(str, c[1:6])) + ("-split" if c[6] else ""))
def test_fused_matches_reference_and_launches(case, monkeypatch):
    """The fused kernel (one launch) against the reference (selected set, per-core scores,
    descending order), the IVE address map of its addresses against ``reference.ive_address``,
    and against the three-launch path: the same addresses in the same order and the same
    scores, bitwise (the grid score is computed the same way). Tucker and product keys (sum
    mode), with and without the address map (``topk_ive`` / ``topk``)."""
    lead, n, r, h_c, k, m, split = case
    kern = rt._kernels
    monkeypatch.setattr(kern, "FUSED_SPLIT_BLOCK", split)
    monkeypatch.setattr(kern, "PHASE1_SPLIT_BLOCK", split)
    if split:
        assert kern._pieces(n, k, True)[1] > 0  # the second piece is in use (and partly masked)
    launches = _count_launches(monkeypatch)
    s_row, s_col, cores, g = _tucker_inputs(lead, n, r, h_c, n * 5 + k + m)
    u, v = _uv(cores)
    rows = s_row.shape[:-2].numel()
    perm = torch.randperm(n * n, generator=g).to(torch.int32)
    p = max(1, n * n // 7)
    s_ref, a_ref = reference.tucker_topk(s_row, s_col, cores, u, v, k, m)
    s_ref, a_ref = s_ref.reshape(rows, m, h_c), a_ref.reshape(rows, m)
    fused = _host(kern.topk_ive, s_row, s_col, cores, u, v, k, m, False, perm, p, path="fused")
    assert launches == {"_fused_kernel": 1}
    _check_selection(s_ref, a_ref, fused[0], fused[1], s_ref.sum(-1), fused[0].sum(-1))
    r_ref, b_ref = reference.ive_address(fused[1], perm, p)
    assert torch.equal(fused[2], r_ref) and torch.equal(fused[3], b_ref)
    three = _host(kern.topk_ive, s_row, s_col, cores, u, v, k, m, False, perm, p, path="launches")
    assert launches == {"_fused_kernel": 1, "_phase1_kernel": 1, "_grid_kernel": 1,
                        "_final_kernel": 1}  # the address map in the final kernel
    for x, y in zip(fused, three):
        assert torch.equal(x, y)
    # product keys: the raw scores, s_a + s_b
    pk_ref, pa_ref = reference.product_key_topk(s_row[..., 0], s_col[..., 0], k, m)
    pk_ref, pa_ref = pk_ref.reshape(rows, m), pa_ref.reshape(rows, m)
    pf = _host(kern.topk_ive, s_row[..., 0], s_col[..., 0], None, None, None, k, m, True, perm, p,
               path="fused")
    _check_selection(pk_ref, pa_ref, pf[0], pf[1], pk_ref, pf[0])
    assert torch.equal(pf[2], reference.ive_address(pf[1], perm, p)[0])
    pl = _host(kern.topk, s_row[..., 0], s_col[..., 0], None, None, None, k, m, True,
               path="launches")  # topk: no address map
    assert torch.equal(pf[0], pl[0]) and torch.equal(pf[1], pl[1])


def test_dispatch_takes_fused(monkeypatch):
    """The dispatcher's kernels take the fused kernel for few rows (one launch) and the three
    launches past FUSED_MAX_ROWS or the fused kernel's limits, with the same result."""
    kern = rt._kernels
    launches = _count_launches(monkeypatch)
    s_row, s_col, cores, _ = _tucker_inputs((2,), 50, 2, 2, 11)
    u, v = _uv(cores)
    with torch.no_grad():
        fused = tucker_topk(s_row, s_col, cores, u, v, 6, 10, impl="triton")
        assert launches == {"_fused_kernel": 1}
        monkeypatch.setattr(kern, "FUSED_MAX_ROWS", 1)  # 2 rows: past it
        three = tucker_topk(s_row, s_col, cores, u, v, 6, 10, impl="triton")
        assert launches["_fused_kernel"] == 1 and launches["_final_kernel"] == 1
        monkeypatch.setattr(kern, "FUSED_MAX_ROWS", 256)
        monkeypatch.setattr(kern, "FUSED_MAX_GRID", 32)  # k 6: an 8x8 grid tile, past it
        tucker_topk(s_row, s_col, cores, u, v, 6, 10, impl="triton")
        assert launches["_fused_kernel"] == 1 and launches["_final_kernel"] == 2
    assert torch.equal(fused[0], three[0]) and torch.equal(fused[1], three[1])
    with pytest.raises(ValueError, match="fused kernel does not take"):
        kern.topk(s_row, s_col, cores, u, v, 6, 10, False, path="fused")


def _stable_topk_ids(p, k):
    """Each row's top-k ids by descending score, ties to the lower id (as the kernels)."""
    return torch.sort(p, dim=-1, descending=True, stable=True).indices[..., :k]


# (rows, N, k, ties): N past a power of two so that phase 1 holds the keys in two pieces, the
# second partly masked (37: 32 + 16 with 5 valid, 130: 128 + 16 with 2 valid, 300: 256 + 64,
# 2200: 2048 + 256 at the 151M training size); ties: scores from three values
PIECES = [(2, 37, 9, False), (2, 37, 9, True), (2, 130, 11, True), (1, 300, 42, False),
          (1, 300, 42, True), (2, 2200, 16, False), (2, 2200, 16, True)]


@pytest.mark.parametrize("rows,n,k,ties", PIECES, ids=str)
def test_phase1_two_pieces(rows, n, k, ties, monkeypatch):
    """Phase 1 (``phase1_select``) with the keys in two pieces, with and without the lower
    bound: the exact selected ids of each side (ties to the lower id, a stable-sort oracle; the
    one-block kernel is checked the same way elsewhere). With ``ties`` the scores take three
    values, so the k-th value ties across both pieces (and in the masked tail's
    neighbourhood), and the tie ranks must continue from one piece into the other."""
    kern = rt._kernels
    monkeypatch.setattr(kern, "PHASE1_SPLIT_BLOCK", True)
    assert kern._pieces(n, k, True)[1] > 0
    g = torch.Generator().manual_seed(n + k)
    if ties:
        s_row = torch.randint(-1, 2, (rows, n, 2), generator=g).float()
        s_col = torch.randint(-1, 2, (rows, n, 2), generator=g).float()
        u, v = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    else:
        s_row, s_col = torch.randn(rows, n, 2, generator=g), torch.randn(rows, n, 2, generator=g)
        u, v = torch.randn(2, generator=g), torch.randn(2, generator=g)
    want = torch.stack([_stable_topk_ids(s_row @ u, k), _stable_topk_ids(s_col @ v, k)], 1)
    for bound in (True, False):
        monkeypatch.setattr(kern, "SELECT_BOUND", bound)
        sel = kern.phase1_select(s_row, s_col, u, v, k, False)
        assert torch.equal(sel.long().sort(-1).values, want.sort(-1).values), bound
    # sum mode (product keys): the raw scores
    sel = kern.phase1_select(s_row[..., 0].contiguous(), s_col[..., 1].contiguous(), None, None, k,
                             True)
    want = torch.stack([_stable_topk_ids(s_row[..., 0], k), _stable_topk_ids(s_col[..., 1], k)], 1)
    assert torch.equal(sel.long().sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("rows,n,k,split", [(2, 37, 9, True), (1, 130, 11, True), (1, 64, 12, False)],
                         ids=str)
def test_fused_phase1_ties_exact(rows, n, k, split, monkeypatch):
    """The fused kernel's phase 1 under heavy ties, observed exactly: product keys with
    ``m = k*k`` select the whole k x k grid, so the returned addresses are all pairs of the two
    sides' phase-1 sets, which must be the stable-sort oracle's (ties to the lower id, across
    both key pieces with FUSED_SPLIT_BLOCK); the three launches return the same."""
    kern = rt._kernels
    monkeypatch.setattr(kern, "FUSED_SPLIT_BLOCK", split)
    g = torch.Generator().manual_seed(n * k)
    s_row = torch.randint(0, 3, (rows, n), generator=g).float()
    s_col = torch.randint(0, 3, (rows, n), generator=g).float()
    s, a = kern.topk(s_row, s_col, None, None, None, k, k * k, True, path="fused")
    ia, ib = _stable_topk_ids(s_row, k), _stable_topk_ids(s_col, k)
    want = (ia[:, :, None] * n + ib[:, None, :]).flatten(1)
    assert torch.equal(a.sort(-1).values, want.sort(-1).values)
    assert torch.equal(s, s_row.gather(1, a // n) + s_col.gather(1, a % n))
    assert (s[:, :-1] >= s[:, 1:]).all()
    s3, a3 = kern.topk(s_row, s_col, None, None, None, k, k * k, True, path="launches")
    assert torch.equal(a, a3) and torch.equal(s, s3)
