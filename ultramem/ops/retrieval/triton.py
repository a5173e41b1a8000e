"""Triton kernels for product-key / TDQKR retrieval (SPEC §2, §3.7-3.8, §7 fused retrieval).

Three launches per call, no ``[.., k, k, h_c]`` intermediate:

1. :func:`_phase1_kernel`, grid ``(R, 2)`` (R = rows = tokens x heads, one program per side):
   phase-1 score ``S @ u`` (rank-1 Tucker approximation; the raw score for product keys) over
   all N keys in registers, exact top-k by a 32-pass radix select on order-preserving integer
   keys, compaction of the k winners with a prefix sum. Writes ``sel [R, 2, k]`` (key ids, in
   id order: the set matters, not its order).
2. :func:`_grid_kernel`, grid ``(R, SPLITS)``: each program takes one chunk of the k x k
   candidate grid (512 candidates for few rows, 4096 for many), rescores it exactly
   (``sum_c S_row[a]^T C_c S_col[b]``, or ``s_a + s_b``), and keeps its local top-m by the same
   radix select. Writes ``SPLITS x m_pad`` candidates.
3. :func:`_final_kernel`, grid ``(R,)``: radix select of the global top-m among the candidates,
   sort of the m winners (``tl.sort`` of packed ``(score, flat)`` 64-bit keys), and the exact
   per-core scores and addresses ``a*N + b`` of the winners.

Optional split phase 1 (``P1_CHUNK > 0``, off by default: it measured no faster at decode):
:func:`_p1_chunk_kernel`, grid ``(R, 2, N / P1_CHUNK)``, local top-k of each chunk of keys,
merged per row by :func:`_p1_merge` at the start of the grid kernel.

Scores are fp32 inside; ties at the k-th / m-th value go to the lower id within a chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_N = 16384  # phase 1 keeps all N scores of a row in registers
GRID_CHUNK = 4096
PHASE1_KERNEL_MAX_ROWS = 1 << 30  # row count above which phase 1 uses torch.topk (benchmarked)
PHASE1_WARPS = 0  # 0: by N and rows (below); benchmarks/ops.py times 2 / 4 / 8
# Split phase 1: stage A, grid (rows, 2, N / P1_CHUNK), local top-k of each chunk; stage B, the
# merge of the chunks' k candidates, runs at the start of the grid kernel. Measured on H200 at
# the 1.6B decode size it was 0.5-1 us slower than one program per row once the grid kernel is
# split (docs/kernels.md), so it is off by default (P1_CHUNK = 0); kept, tested, for other shapes.
P1_CHUNK = 0  # keys per stage-A program; 0 disables the split path
P1_CHUNK_WARPS = 1
P1_SPLIT_MAX_ROWS = 64  # rows (tokens x heads) up to which the split path is used
GRID_CHUNK_SPLIT = 512  # grid-kernel chunk on the split path (more programs per row)
# few rows: the k x k grid in 512-candidate chunks (4 programs a row for k = 42) instead of one
# program per row: 32 -> 27 us for tucker_topk at 2-128 rows on H200
GRID_CHUNK_FEW = 512
GRID_FEW_MAX_ROWS = 256  # measured up to 128 rows; many rows keep GRID_CHUNK
GRID_WARPS = 0  # 0: 8 for a 4096 chunk, else 4
# radix select from a lower bound with an early exit (``_select``); False: all 32 passes
SELECT_BOUND = True


@triton.jit
def _select(key, need, KCH: tl.constexpr, BOUND: tl.constexpr):
    """Mask and output slot of the ``need`` largest uint32 keys (0 = invalid), ties by position.

    Radix select from the top bit: ``thr`` grows one bit a pass (a block-wide count of
    ``key >= thr | bit``) to the largest value with at least ``need`` keys at or above it.
    ``BOUND`` (default) shortens the chain of passes, which is what a row's latency is made of:

    - a lower bound: the ``KCH >= need`` strided chunks' maxima are ``KCH`` distinct keys, so
      at least ``need`` keys are >= their minimum ``lb``; the threshold lies in ``[lb, max]``
      and the bits above the highest bit where ``lb`` and ``max`` differ are known at once
      (for real scores that skips the sign and exponent bits);
    - an early exit: once a pass counts exactly ``need`` keys at or above the candidate, the
      set is found (continuous scores get there about log2(N / need) + a few passes in).

    Without ``BOUND``: all 32 passes. A 2-4-bit-a-pass variant (one ``[2^b, BLOCK]`` count per
    pass) measured 2x slower on H200 (docs/kernels.md).
    """
    step = tl.full([], 0x80000000, tl.uint32)
    thr = tl.zeros([], dtype=tl.uint32)
    if BOUND:
        hi = tl.max(key, axis=0)
        lb = tl.min(tl.max(tl.reshape(key, [key.shape[0] // KCH, KCH]), axis=0), axis=0)
        while (step != 0) & ((lb & step) == (hi & step)):  # the common prefix of lb and max
            thr = thr | (hi & step)
            step = step >> 1
        while step != 0:
            cand = thr | step
            cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
            thr = tl.where(cnt >= need, cand, thr)
            step = tl.where(cnt == need, tl.zeros([], dtype=tl.uint32), step >> 1)
    else:
        for _ in range(32):
            cand = thr | step
            cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
            thr = tl.where(cnt >= need, cand, thr)
            step = step >> 1
    ge = key >= thr
    n_ge = tl.sum(ge.to(tl.int32), axis=0)
    if n_ge == need:  # no tie at the threshold (always so after an early exit)
        take = ge
    else:  # keys equal to thr fill the remaining slots in position order
        gt = key > thr
        eq = key == thr
        n_gt = tl.sum(gt.to(tl.int32), axis=0)
        eq_rank = tl.cumsum(eq.to(tl.int32), axis=0)
        take = gt | (eq & (eq_rank <= need - n_gt))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    return take, pos


@triton.jit
def _ukey32(x):
    """fp32 -> uint32 with the same order (0 only for a NaN pattern: used as 'invalid')."""
    b = x.to(tl.uint32, bitcast=True)
    flip = tl.where((b >> 31) == 1, tl.full(b.shape, 0xFFFFFFFF, tl.uint32),
                    tl.full(b.shape, 0x80000000, tl.uint32))
    return b ^ flip


@triton.jit
def _threshold32(key, need, AXIS: tl.constexpr):
    """Largest uint32 ``thr`` with at least ``need`` keys >= thr along AXIS (32 passes)."""
    if AXIS == 0:
        thr = tl.zeros([], dtype=tl.uint32)
    else:
        thr = tl.zeros([key.shape[0]], dtype=tl.uint32)
    for i in tl.static_range(32):
        cand = thr | (tl.full([], 1, tl.uint32) << (31 - i))
        if AXIS == 0:
            cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
        else:
            cnt = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
        thr = tl.where(cnt >= need, cand, thr)
    return thr


@triton.jit
def _p1_chunk_kernel(srow_ptr, scol_ptr, u_ptr, v_ptr, ck_ptr, ci_ptr, N, K, NCHUNK,
                     RANK: tl.constexpr, CHUNK: tl.constexpr):
    """Stage A: top-K of one CHUNK of one row's phase-1 scores -> K (key, id) candidates."""
    row = tl.program_id(0).to(tl.int64)
    side = tl.program_id(1)
    ch = tl.program_id(2)
    offs = ch * CHUNK + tl.arange(0, CHUNK)
    mask = offs < N
    p = tl.zeros([CHUNK], dtype=tl.float32)
    if side == 0:
        for t in tl.static_range(RANK):
            w = tl.load(u_ptr + t).to(tl.float32)
            p += w * tl.load(srow_ptr + (row * N + offs) * RANK + t, mask=mask, other=0.0).to(tl.float32)
    else:
        for t in tl.static_range(RANK):
            w = tl.load(v_ptr + t).to(tl.float32)
            p += w * tl.load(scol_ptr + (row * N + offs) * RANK + t, mask=mask, other=0.0).to(tl.float32)
    key = tl.where(mask, _ukey32(p), tl.zeros([CHUNK], dtype=tl.uint32))
    need = tl.minimum(tl.sum(mask.to(tl.int32), axis=0), K)
    thr = _threshold32(key, need, 0)
    gt = key > thr
    eq = key == thr
    n_gt = tl.sum(gt.to(tl.int32), axis=0)
    eq_rank = tl.cumsum(eq.to(tl.int32), axis=0)
    take = gt | (eq & (eq_rank <= need - n_gt))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    base = ((row * 2 + side) * NCHUNK + ch) * K
    offs_k = tl.arange(0, CHUNK)
    # slots past `need` (a short last chunk) hold the invalid key 0
    tl.store(ck_ptr + base + offs_k, tl.zeros([CHUNK], dtype=tl.uint32),
             mask=(offs_k >= need) & (offs_k < K))
    tl.store(ck_ptr + base + pos, key, mask=take)
    tl.store(ci_ptr + base + pos, offs, mask=take)


@triton.jit
def _p1_merge(ck_ptr, ci_ptr, sel_ptr, row, K, NC, NCB: tl.constexpr):
    """Stage B: both sides' top-K among their NC chunk candidates -> ``sel [row, 2, K]``.

    Chunks hold disjoint id ranges in order, so ties at the K-th value go to the lower id."""
    side = tl.arange(0, 2)
    offs = tl.arange(0, NCB)
    mask = (side[:, None] < 2) & (offs[None, :] < NC)
    ptr = (row * 2 + side[:, None]) * NC + offs[None, :]
    key = tl.load(ck_ptr + ptr, mask=mask, other=0)
    ids = tl.load(ci_ptr + ptr, mask=mask, other=0)
    thr = _threshold32(key, K, 1)
    gt = key > thr[:, None]
    eq = key == thr[:, None]
    n_gt = tl.sum(gt.to(tl.int32), axis=1)
    eq_rank = tl.cumsum(eq.to(tl.int32), axis=1)
    take = gt | (eq & (eq_rank <= (K - n_gt)[:, None]))
    pos = tl.cumsum(take.to(tl.int32), axis=1) - 1
    tl.store(sel_ptr + (row * 2 + side[:, None]) * K + pos, ids, mask=take)


@triton.jit
def _phase1_kernel(srow_ptr, scol_ptr, u_ptr, v_ptr, sel_ptr, N, K,
                   RANK: tl.constexpr, BLOCK: tl.constexpr, KCH: tl.constexpr,
                   BOUND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    side = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    p = tl.zeros([BLOCK], dtype=tl.float32)
    if side == 0:
        for t in tl.static_range(RANK):
            w = tl.load(u_ptr + t).to(tl.float32)
            p += w * tl.load(srow_ptr + (row * N + offs) * RANK + t, mask=mask, other=0.0).to(tl.float32)
    else:
        for t in tl.static_range(RANK):
            w = tl.load(v_ptr + t).to(tl.float32)
            p += w * tl.load(scol_ptr + (row * N + offs) * RANK + t, mask=mask, other=0.0).to(tl.float32)
    key = tl.where(mask, _ukey32(p), tl.zeros([BLOCK], dtype=tl.uint32))
    take, pos = _select(key, K, KCH, BOUND)
    tl.store(sel_ptr + (row * 2 + side) * K + pos, offs, mask=take)


@triton.jit
def _exact(srow_ptr, scol_ptr, c_ptr, row, ia, ib, valid, N,
           RANK: tl.constexpr, HC: tl.constexpr, CORE: tl.constexpr, SUM_MODE: tl.constexpr):
    """Exact grid score of candidates (ia, ib): core CORE's bilinear form, or all cores summed."""
    if SUM_MODE:
        s = tl.load(srow_ptr + row * N + ia, mask=valid, other=0.0).to(tl.float32)
        s += tl.load(scol_ptr + row * N + ib, mask=valid, other=0.0).to(tl.float32)
    else:
        s = tl.zeros(ia.shape, dtype=tl.float32)
        for t in tl.static_range(RANK):
            ra = tl.load(srow_ptr + (row * N + ia) * RANK + t, mask=valid, other=0.0).to(tl.float32)
            for w in tl.static_range(RANK):
                cb = tl.load(scol_ptr + (row * N + ib) * RANK + w, mask=valid, other=0.0).to(tl.float32)
                coef = 0.0
                for c in tl.static_range(HC):
                    if (CORE < 0) or (CORE == c):
                        coef += tl.load(c_ptr + (c * RANK + t) * RANK + w).to(tl.float32)
                s += ra * coef * cb
    return s


@triton.jit
def _grid_kernel(srow_ptr, scol_ptr, c_ptr, sel_ptr, ckey_ptr, cf_ptr, N, K, M,
                 p1k_ptr, p1i_ptr, NC,
                 RANK: tl.constexpr, HC: tl.constexpr, SUM_MODE: tl.constexpr,
                 CHUNK: tl.constexpr, M_PAD: tl.constexpr, MERGE: tl.constexpr,
                 NCB: tl.constexpr, BOUND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    nsp = tl.num_programs(1)
    if MERGE:  # split phase 1, stage B: every split merges (same result), then reads it back
        _p1_merge(p1k_ptr, p1i_ptr, sel_ptr, row, K, NC, NCB)
        tl.debug_barrier()
    f = sp * CHUNK + tl.arange(0, CHUNK)
    valid = f < K * K
    ia = tl.load(sel_ptr + row * 2 * K + f // K, mask=valid, other=0).to(tl.int64)
    ib = tl.load(sel_ptr + row * 2 * K + K + f % K, mask=valid, other=0).to(tl.int64)
    s = _exact(srow_ptr, scol_ptr, c_ptr, row, ia, ib, valid, N, RANK, HC, -1, SUM_MODE)
    key = tl.where(valid, _ukey32(s), tl.zeros([CHUNK], dtype=tl.uint32))
    need = tl.minimum(tl.sum(valid.to(tl.int32), axis=0), M)
    take, pos = _select(key, need, M_PAD, BOUND)
    base = (row * nsp + sp) * M_PAD
    offs_m = tl.arange(0, M_PAD)
    tl.store(ckey_ptr + base + offs_m, tl.zeros([M_PAD], dtype=tl.uint32), mask=offs_m >= need)
    tl.store(ckey_ptr + base + pos, key, mask=take)
    tl.store(cf_ptr + base + pos, f, mask=take)


@triton.jit
def _final_kernel(srow_ptr, scol_ptr, c_ptr, sel_ptr, ckey_ptr, cf_ptr, tmp_ptr,
                  out_s_ptr, out_a_ptr, N, K, M, NCAND,
                  RANK: tl.constexpr, HC: tl.constexpr, SUM_MODE: tl.constexpr,
                  BLOCK: tl.constexpr, M_PAD: tl.constexpr, BOUND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < NCAND
    key = tl.load(ckey_ptr + row * NCAND + offs, mask=mask, other=0)
    f = tl.load(cf_ptr + row * NCAND + offs, mask=mask, other=0).to(tl.int64)
    take, pos = _select(key, M, M_PAD, BOUND)
    packed = ((key.to(tl.int64) - 2147483647 - 1) << 32) | f  # by score, then flat index
    tl.store(tmp_ptr + row * M_PAD + pos, packed, mask=take)
    tl.debug_barrier()
    offs_m = tl.arange(0, M_PAD)
    mm = offs_m < M
    best = tl.load(tmp_ptr + row * M_PAD + offs_m, mask=mm, other=-9223372036854775807)
    best = tl.sort(best, descending=True)
    fl = best - ((best >> 32) << 32)
    ia = tl.load(sel_ptr + row * 2 * K + fl // K, mask=mm, other=0).to(tl.int64)
    ib = tl.load(sel_ptr + row * 2 * K + K + fl % K, mask=mm, other=0).to(tl.int64)
    tl.store(out_a_ptr + row * M + offs_m, ia * N + ib, mask=mm)
    if SUM_MODE:
        s = _exact(srow_ptr, scol_ptr, c_ptr, row, ia, ib, mm, N, RANK, HC, -1, SUM_MODE)
        tl.store(out_s_ptr + row * M + offs_m, s.to(out_s_ptr.dtype.element_ty), mask=mm)
    else:
        for c in tl.static_range(HC):
            s = _exact(srow_ptr, scol_ptr, c_ptr, row, ia, ib, mm, N, RANK, HC, c, SUM_MODE)
            tl.store(out_s_ptr + (row * M + offs_m) * HC + c, s.to(out_s_ptr.dtype.element_ty),
                     mask=mm)


@triton.jit
def _ive_kernel(addr_ptr, perm_ptr, row_ptr, blk_ptr, n_addr, num_rows, BLOCK: tl.constexpr):
    """``row, block = divmod(perm[addr], P)`` (SPEC §3.6) in one launch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_addr
    a = tl.load(addr_ptr + offs, mask=mask, other=0)
    pi = tl.load(perm_ptr + a, mask=mask, other=0).to(tl.int64)
    blk = pi // num_rows
    tl.store(row_ptr + offs, pi - blk * num_rows, mask=mask)
    tl.store(blk_ptr + offs, blk, mask=mask)


def ive_address(addr, perm, num_rows):
    """``(row, block)`` int64, each shaped like ``addr``."""
    addr = addr.contiguous()
    rows = torch.empty(addr.shape, device=addr.device, dtype=torch.int64)
    blk = torch.empty_like(rows)
    n = addr.numel()
    if n:
        block = min(1024, triton.next_power_of_2(n))
        _ive_kernel[(triton.cdiv(n, block),)](addr, perm, rows, blk, n, num_rows, BLOCK=block,
                                              num_warps=4 if block >= 512 else 1)
    return rows, blk


def supported(n: int, k: int, m: int) -> bool:
    """Shapes the kernels handle (else the dispatcher takes the reference)."""
    return n <= MAX_N and 0 < k <= n and 0 < m <= k * k and m <= 1024 and k * k < 2**31


def topk(s_row, s_col, cores, u, v, k, m, sum_mode, phase1=None):
    """``s_row, s_col [R, N, r]`` (``[R, N]`` in sum mode) -> ``(scores [R, m(, h_c)], addr [R, m])``.

    ``phase1``: ``"split"`` (chunked radix select over many programs per row, then a merge in
    the grid kernel: best for a few rows), ``"kernel"`` (one program per row and side, radix
    select in registers), ``"torch"`` (``torch.topk``), ``None`` = by row count
    (:data:`P1_SPLIT_MAX_ROWS`, :data:`PHASE1_KERNEL_MAX_ROWS`).
    """
    rows, n = s_row.shape[0], s_row.shape[1]
    rank = 1 if sum_mode else s_row.shape[2]
    h_c = 1 if sum_mode else cores.shape[0]
    dev = s_row.device
    m_pad = triton.next_power_of_2(m)
    kk = k * k
    if phase1 is None:
        if P1_CHUNK and rows <= P1_SPLIT_MAX_ROWS and n > P1_CHUNK:
            phase1 = "split"
        else:
            phase1 = "kernel" if rows <= PHASE1_KERNEL_MAX_ROWS else "torch"
    p1_chunk = max(P1_CHUNK or 256, triton.next_power_of_2(k))
    if phase1 == "split" and n <= p1_chunk:
        phase1 = "kernel"
    if phase1 == "split":
        gmax = GRID_CHUNK_SPLIT
    else:
        gmax = GRID_CHUNK_FEW if rows <= GRID_FEW_MAX_ROWS else GRID_CHUNK
    chunk = max(min(triton.next_power_of_2(kk), gmax), m_pad)
    splits = triton.cdiv(kk, chunk)
    sel = torch.empty(rows, 2, k, device=dev, dtype=torch.int32)
    ckey = torch.empty(rows, splits, m_pad, device=dev, dtype=torch.uint32)
    cf = torch.empty(rows, splits, m_pad, device=dev, dtype=torch.int32)
    tmp = torch.empty(rows, m_pad, device=dev, dtype=torch.int64)
    shape = (rows, m) if sum_mode else (rows, m, h_c)
    out_s = torch.empty(shape, device=dev, dtype=s_row.dtype)
    out_a = torch.empty(rows, m, device=dev, dtype=torch.int64)
    if rows == 0:
        return out_s, out_a
    if sum_mode:
        one = torch.ones(1, device=dev, dtype=torch.float32)
        u = v = cores = one
    merge, p1k, p1i, nc = False, sel, sel, 1
    if phase1 == "split":
        nchunk = triton.cdiv(n, p1_chunk)
        nc = nchunk * k
        p1k = torch.empty(rows, 2, nchunk, k, device=dev, dtype=torch.uint32)
        p1i = torch.empty(rows, 2, nchunk, k, device=dev, dtype=torch.int32)
        _p1_chunk_kernel[(rows, 2, nchunk)](s_row, s_col, u, v, p1k, p1i, n, k, nchunk,
                                            RANK=rank, CHUNK=p1_chunk, num_warps=P1_CHUNK_WARPS)
        merge = True
    elif phase1 == "kernel":
        block = triton.next_power_of_2(n)
        # measured on H200: 8 warps best for a few rows (latency), 4 for many (throughput)
        warps = PHASE1_WARPS or (8 if block >= 4096 and rows < 4096 else 4)
        _phase1_kernel[(rows, 2)](s_row, s_col, u, v, sel, n, k, RANK=rank, BLOCK=block,
                                  KCH=triton.next_power_of_2(k), BOUND=SELECT_BOUND,
                                  num_warps=warps)
    else:
        p_row = s_row.float() if sum_mode else s_row.float() @ u.float()
        p_col = s_col.float() if sum_mode else s_col.float() @ v.float()
        sel[:, 0] = p_row.topk(k, dim=-1).indices
        sel[:, 1] = p_col.topk(k, dim=-1).indices
    _grid_kernel[(rows, splits)](s_row, s_col, cores, sel, ckey, cf, n, k, m, p1k, p1i, nc,
                                 RANK=rank, HC=h_c, SUM_MODE=sum_mode, CHUNK=chunk, M_PAD=m_pad,
                                 MERGE=merge, NCB=triton.next_power_of_2(nc), BOUND=SELECT_BOUND,
                                 num_warps=GRID_WARPS or (8 if chunk >= 4096 else 4))
    ncand = splits * m_pad
    fblock = triton.next_power_of_2(ncand)
    _final_kernel[(rows,)](s_row, s_col, cores, sel, ckey, cf, tmp, out_s, out_a, n, k, m,
                           ncand, RANK=rank, HC=h_c, SUM_MODE=sum_mode, BLOCK=fblock,
                           M_PAD=m_pad, BOUND=SELECT_BOUND,
                           num_warps=8 if fblock >= 4096 else 4)
    return out_s, out_a
