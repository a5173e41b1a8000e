"""Retrieval: the Triton kernels (interpreter on CPU) against the PyTorch reference.

Same selected set and the same per-core scores (ties aside), order by summed score, and
gradients to ``s_row``, ``s_col`` and ``cores`` through the returned scores; phase 1 with the
keys in one block and in two pieces, the grid in one chunk and several, heavy ties.

    .venv/bin/python -m pytest tests/ops/test_retrieval.py
"""

from __future__ import annotations

import collections

import pytest
import torch

import ultramem.ops.retrieval as rt
from ultramem.ops.retrieval import product_key_topk, reference, tucker_topk

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("interpret")]


@pytest.fixture
def rtk():
    """The kernel module (imported here: under the interpreter only)."""
    import ultramem.ops.retrieval.triton as kernels

    return kernels

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


def _count_launches(monkeypatch, kernels) -> collections.Counter:
    """Count the retrieval kernels' launches (the host functions look them up per call)."""
    counts = collections.Counter()
    for name in ("_phase1_kernel", "_grid_kernel", "_final_kernel", "_ive_kernel"):
        monkeypatch.setattr(kernels, name, _Counted(getattr(kernels, name), name, counts))
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


# (lead, N, r, h_c, k, m, grid chunk): k*k in one grid chunk and in several, m from 11 to 84
GRIDS = [
    ((2, 3), 37, 2, 2, 9, 11, 64),
    ((3,), 100, 2, 1, 16, 20, 128),
    ((2,), 300, 3, 2, 40, 42, 512),
    ((1, 2), 130, 2, 2, 32, 84, 256),
    ((4,), 200, 2, 3, 8, 64, 64),
]


@pytest.mark.parametrize("case", GRIDS, ids=lambda c: "x".join(map(str, c[1:])))
@pytest.mark.parametrize("many_rows", [False, True], ids=["few_rows", "many_rows"])
def test_grid_chunks(case, many_rows, monkeypatch, rtk):
    """The grid kernel split into chunks (the few-rows default) and in chunks of GRID_CHUNK
    (many rows): same selection and scores as the reference."""
    lead, n, r, h_c, k, m, gchunk = case
    monkeypatch.setattr(rtk, "GRID_CHUNK_FEW", gchunk)
    monkeypatch.setattr(rtk, "GRID_FEW_PER_M", 0)  # exactly this chunk, whatever m
    if many_rows:
        monkeypatch.setattr(rtk, "GRID_FEW_MAX_ROWS", 0)
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


@pytest.mark.parametrize("lead,n,k,m", [((3,), 40, 7, 9), ((2,), 300, 42, 42), ((1,), 64, 64, 100)],
                         ids=str)
def test_selection_with_heavy_ties(lead, n, k, m, monkeypatch, rtk):
    """Scores from a handful of values: every selection ties at its threshold, so neither the
    lower bound's prefix nor the early exit can finish early and the tie path decides. The
    selected scores must equal a stable-sort oracle's, addresses must be distinct and in
    range, and each returned per-core score must be the exact score of its address (N 40 and
    300: phase 1 in two pieces; 64: one block)."""
    launches = _count_launches(monkeypatch, rtk)
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
    assert launches == {"_phase1_kernel": 2, "_grid_kernel": 2, "_final_kernel": 2}


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


@pytest.mark.parametrize("window,pool_rows,offset,perm,shape", [
    (9, 30, 12, 0, (1, 5)),  # forward ring, no wrap
    (20, 30, 25, 0, (3, 2, 7)),  # wraps past the pool's end
    (20, 30, -5, 1, (2, 40)),  # centred ring, layer 0: negative offset; a shuffle first
    (1500, 4000, 3700, 1, (4, 300)),
])
def test_ring_address_matches_reference(window, pool_rows, offset, perm, shape):
    """UltraMemV2's ring map in one launch: ``(local, row)`` equal to the reference's floor
    modulos (non-negative rows for a negative offset), with and without the address shuffle."""
    g = torch.Generator().manual_seed(window + pool_rows)
    n_sq = 4 * window
    table = torch.randperm(n_sq, generator=g).to(torch.int32) if perm else None
    addr = torch.randint(0, n_sq, shape, generator=g)
    addr[..., 0] = addr[..., -1]  # duplicates
    off = torch.tensor(offset)
    local, rows = rt.ring_address(addr, table, window, off, pool_rows, impl="triton")
    ref_local, ref_rows = reference.ring_address(addr, table, window, off, pool_rows)
    assert local.dtype == rows.dtype == torch.int64 and rows.shape == addr.shape
    assert torch.equal(local, ref_local) and torch.equal(rows, ref_rows)
    assert int(rows.min()) >= 0 and int(rows.max()) < pool_rows
    a = table[addr].long() if perm else addr
    assert torch.equal(rows, (a % window + offset) % pool_rows)


# (lead, N, r, h_c, k, m): k*k not a power of two, m from 1 to k*k, N not a power of two (37,
# 130, 300, 600: phase 1 in two pieces, the second partly masked; 5, 100: one masked block) and
# a power of two, r and h_c 1-3
SHAPES = [
    ((1,), 5, 1, 1, 3, 4),
    ((1, 3), 37, 2, 2, 9, 11),
    ((3,), 100, 3, 3, 16, 1),
    ((2,), 300, 2, 2, 42, 42),
    ((1,), 130, 1, 2, 11, 121),
    ((2,), 64, 2, 1, 8, 64),
    ((1,), 600, 2, 3, 64, 100),
]


def _tucker_inputs(lead, n, r, h_c, seed):
    g = torch.Generator().manual_seed(seed)
    s_row, s_col = torch.randn(*lead, n, r, generator=g), torch.randn(*lead, n, r, generator=g)
    cores = torch.randn(h_c, r, r, generator=g)
    return s_row, s_col, cores, g


@pytest.mark.parametrize("case", SHAPES, ids=lambda c: "x".join(map(str, c[1:6])))
def test_shapes_match_reference(case, monkeypatch, rtk):
    """Three launches per call (phase 1, grid, final) over the shape table: the reference's
    selected set, per-core scores and descending order, Tucker and product keys; the IVE
    address map of the addresses against ``reference.ive_address`` (one more launch)."""
    lead, n, r, h_c, k, m = case
    if n in (37, 130, 300, 600):
        assert rtk._pieces(n, k)[1] > 0  # the second piece is in use (and partly masked)
    launches = _count_launches(monkeypatch, rtk)
    s_row, s_col, cores, g = _tucker_inputs(lead, n, r, h_c, n * 5 + k + m)
    u, v = _uv(cores)
    s_ref, a_ref = reference.tucker_topk(s_row, s_col, cores, u, v, k, m)
    with torch.no_grad():
        s_k, a_k = tucker_topk(s_row, s_col, cores, u, v, k, m, impl="triton")
    assert launches == {"_phase1_kernel": 1, "_grid_kernel": 1, "_final_kernel": 1}
    _check_selection(s_ref, a_ref, s_k, a_k, s_ref.sum(-1), s_k.sum(-1))
    perm = torch.randperm(n * n, generator=g).to(torch.int32)
    p = max(1, n * n // 7)
    rows, blk = rt.ive_address(a_k, perm, p, impl="triton")
    r_ref, b_ref = reference.ive_address(a_k, perm, p)
    assert torch.equal(rows, r_ref) and torch.equal(blk, b_ref)
    pk_ref, pa_ref = reference.product_key_topk(s_row[..., 0], s_col[..., 0], k, m)
    pk, pa = product_key_topk(s_row[..., 0], s_col[..., 0], k, m, impl="triton")
    _check_selection(pk_ref, pa_ref, pk, pa, pk_ref, pk)


def test_unsupported_shapes_take_reference(monkeypatch, rtk):
    """N above MAX_N (or m above 1024) is not a kernel shape: the reference runs, no launch."""
    launches = _count_launches(monkeypatch, rtk)
    monkeypatch.setattr(rtk, "MAX_N", 16)
    s_row, s_col, cores, _ = _tucker_inputs((2,), 20, 2, 2, 3)
    u, v = _uv(cores)
    out = tucker_topk(s_row, s_col, cores, u, v, 4, 5, impl="triton")
    ref = reference.tucker_topk(s_row, s_col, cores, u, v, 4, 5)
    assert torch.equal(out[1], ref[1]) and torch.equal(out[0], ref[0])
    assert not launches


def _stable_topk_ids(p, k):
    """Each row's top-k ids by descending score, ties to the lower id (as the kernels)."""
    return torch.sort(p, dim=-1, descending=True, stable=True).indices[..., :k]


# (rows, N, k, ties): N past a power of two so that phase 1 holds the keys in two pieces, the
# second partly masked (37: 32 + 16 with 5 valid, 130: 128 + 16 with 2 valid, 300: 256 + 64,
# 2200: 2048 + 256 at the 151M training size); ties: scores from three values
PIECES = [(2, 37, 9, False), (2, 37, 9, True), (2, 130, 11, True), (1, 300, 42, False),
          (1, 300, 42, True), (2, 2200, 16, False), (2, 2200, 16, True)]


@pytest.mark.parametrize("rows,n,k,ties", PIECES, ids=str)
def test_phase1_two_pieces(rows, n, k, ties, rtk):
    """Phase 1 (``phase1_select``) with the keys in two pieces: the exact selected ids of each
    side (ties to the lower id, a stable-sort oracle). With ``ties`` the scores take three
    values, so the k-th value ties across both pieces (and in the masked tail's
    neighbourhood), and the tie ranks must continue from one piece into the other."""
    assert rtk._pieces(n, k)[1] > 0
    g = torch.Generator().manual_seed(n + k)
    if ties:
        s_row = torch.randint(-1, 2, (rows, n, 2), generator=g).float()
        s_col = torch.randint(-1, 2, (rows, n, 2), generator=g).float()
        u, v = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    else:
        s_row, s_col = torch.randn(rows, n, 2, generator=g), torch.randn(rows, n, 2, generator=g)
        u, v = torch.randn(2, generator=g), torch.randn(2, generator=g)
    want = torch.stack([_stable_topk_ids(s_row @ u, k), _stable_topk_ids(s_col @ v, k)], 1)
    sel = rtk.phase1_select(s_row, s_col, u, v, k, False)
    assert torch.equal(sel.long().sort(-1).values, want.sort(-1).values)
    # sum mode (product keys): the raw scores
    sel = rtk.phase1_select(s_row[..., 0].contiguous(), s_col[..., 1].contiguous(), None, None, k,
                            True)
    want = torch.stack([_stable_topk_ids(s_row[..., 0], k), _stable_topk_ids(s_col[..., 1], k)], 1)
    assert torch.equal(sel.long().sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("rows,n,k", [(2, 37, 9), (1, 130, 11), (1, 64, 12)], ids=str)
def test_phase1_ties_exact_through_the_grid(rows, n, k, rtk):
    """Phase 1 under heavy ties, observed through the whole retrieval: product keys with
    ``m = k*k`` select the whole k x k grid, so the returned addresses are all pairs of the two
    sides' phase-1 sets, which must be the stable-sort oracle's (ties to the lower id, across
    both key pieces for N 37 and 130)."""
    g = torch.Generator().manual_seed(n * k)
    s_row = torch.randint(0, 3, (rows, n), generator=g).float()
    s_col = torch.randint(0, 3, (rows, n), generator=g).float()
    s, a = rtk.topk(s_row, s_col, None, None, None, k, k * k, True)
    ia, ib = _stable_topk_ids(s_row, k), _stable_topk_ids(s_col, k)
    want = (ia[:, :, None] * n + ib[:, None, :]).flatten(1)
    assert torch.equal(a.sort(-1).values, want.sort(-1).values)
    assert torch.equal(s, s_row.gather(1, a // n) + s_col.gather(1, a % n))
    assert (s[:, :-1] >= s[:, 1:]).all()
