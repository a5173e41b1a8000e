"""Triton kernels for product-key / TDQKR retrieval (SPEC §2, §3.7-3.8, §7 fused retrieval).

Three launches per call, no ``[.., k, k, h_c]`` intermediate:

1. :func:`_phase1_kernel`, grid ``(R, 2)`` (R = rows = tokens x heads, one program per side):
   phase-1 score ``S @ u`` (rank-1 Tucker approximation; the raw score for product keys) over
   all N keys in registers, exact top-k by a 32-pass radix select on order-preserving integer
   keys, compaction of the k winners with a prefix sum. Writes ``sel [R, 2, k]`` (key ids, in
   id order: the set matters, not its order).
2. :func:`_grid_kernel`, grid ``(R, SPLITS)``: each program takes one chunk of the k x k
   candidate grid, rescores it exactly (``sum_c S_row[a]^T C_c S_col[b]``, or ``s_a + s_b``),
   and keeps its local top-m by the same radix select. Writes ``SPLITS x m_pad`` candidates.
3. :func:`_final_kernel`, grid ``(R,)``: radix select of the global top-m among the candidates,
   sort of the m winners (``tl.sort`` of packed ``(score, flat)`` 64-bit keys), and the exact
   per-core scores and addresses ``a*N + b`` of the winners.

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


@triton.jit
def _ukey(x):
    """fp32 -> int64 in [0, 2^32) with the same order (for radix select)."""
    b = x.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(b < 0, -1 - b, b + 2147483647 + 1)


@triton.jit
def _select(key, need):
    """Mask and output slot of the ``need`` largest keys (key -1 = invalid), ties by position.

    Radix select from the top bit, one bit a pass (32 block-wide counts). A 2-4-bit-a-pass
    variant (one ``[2^b, BLOCK]`` count per pass) measured 2x slower on H200 (docs/kernels.md).
    """
    thr = tl.zeros([], dtype=tl.int64)
    step = tl.full([], 2147483647, tl.int64) + 1
    for _ in range(32):
        cand = thr + step
        cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
        thr = tl.where(cnt >= need, cand, thr)
        step = step // 2
    gt = key > thr
    eq = key == thr
    n_gt = tl.sum(gt.to(tl.int32), axis=0)
    eq_rank = tl.cumsum(eq.to(tl.int32), axis=0)
    take = gt | (eq & (eq_rank <= need - n_gt))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    return take, pos


@triton.jit
def _phase1_kernel(srow_ptr, scol_ptr, u_ptr, v_ptr, sel_ptr, N, K,
                   RANK: tl.constexpr, BLOCK: tl.constexpr):
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
    key = tl.where(mask, _ukey(p), -1)
    take, pos = _select(key, K)
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
                 RANK: tl.constexpr, HC: tl.constexpr, SUM_MODE: tl.constexpr,
                 CHUNK: tl.constexpr, M_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    nsp = tl.num_programs(1)
    f = sp * CHUNK + tl.arange(0, CHUNK)
    valid = f < K * K
    ia = tl.load(sel_ptr + row * 2 * K + f // K, mask=valid, other=0).to(tl.int64)
    ib = tl.load(sel_ptr + row * 2 * K + K + f % K, mask=valid, other=0).to(tl.int64)
    s = _exact(srow_ptr, scol_ptr, c_ptr, row, ia, ib, valid, N, RANK, HC, -1, SUM_MODE)
    key = tl.where(valid, _ukey(s), -1)
    need = tl.minimum(tl.sum(valid.to(tl.int32), axis=0), M)
    take, pos = _select(key, need)
    base = (row * nsp + sp) * M_PAD
    offs_m = tl.arange(0, M_PAD)
    tl.store(ckey_ptr + base + offs_m, tl.full([M_PAD], -1, tl.int64), mask=offs_m >= need)
    tl.store(ckey_ptr + base + pos, key, mask=take)
    tl.store(cf_ptr + base + pos, f, mask=take)


@triton.jit
def _final_kernel(srow_ptr, scol_ptr, c_ptr, sel_ptr, ckey_ptr, cf_ptr, tmp_ptr,
                  out_s_ptr, out_a_ptr, N, K, M, NCAND,
                  RANK: tl.constexpr, HC: tl.constexpr, SUM_MODE: tl.constexpr,
                  BLOCK: tl.constexpr, M_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < NCAND
    key = tl.load(ckey_ptr + row * NCAND + offs, mask=mask, other=-1)
    f = tl.load(cf_ptr + row * NCAND + offs, mask=mask, other=0).to(tl.int64)
    take, pos = _select(key, M)
    packed = ((key - 2147483647 - 1) << 32) | f  # order by score, then by flat index
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


def supported(n: int, k: int, m: int) -> bool:
    """Shapes the kernels handle (else the dispatcher takes the reference)."""
    return n <= MAX_N and 0 < k <= n and 0 < m <= k * k and m <= 1024 and k * k < 2**31


def topk(s_row, s_col, cores, u, v, k, m, sum_mode, phase1=None):
    """``s_row, s_col [R, N, r]`` (``[R, N]`` in sum mode) -> ``(scores [R, m(, h_c)], addr [R, m])``.

    ``phase1``: ``"kernel"`` (radix select in registers, best at decode sizes), ``"torch"``
    (``torch.topk``, better for many rows), ``None`` = by row count (:data:`PHASE1_KERNEL_MAX_ROWS`).
    """
    rows, n = s_row.shape[0], s_row.shape[1]
    rank = 1 if sum_mode else s_row.shape[2]
    h_c = 1 if sum_mode else cores.shape[0]
    dev = s_row.device
    m_pad = triton.next_power_of_2(m)
    kk = k * k
    chunk = max(min(triton.next_power_of_2(kk), GRID_CHUNK), m_pad)
    splits = triton.cdiv(kk, chunk)
    sel = torch.empty(rows, 2, k, device=dev, dtype=torch.int32)
    ckey = torch.empty(rows, splits, m_pad, device=dev, dtype=torch.int64)
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
    if phase1 is None:
        phase1 = "kernel" if rows <= PHASE1_KERNEL_MAX_ROWS else "torch"
    if phase1 == "kernel":
        block = triton.next_power_of_2(n)
        # measured on H200: 8 warps best for a few rows (latency), 4 for many (throughput)
        warps = PHASE1_WARPS or (8 if block >= 4096 and rows < 4096 else 4)
        _phase1_kernel[(rows, 2)](s_row, s_col, u, v, sel, n, k, RANK=rank, BLOCK=block,
                                  num_warps=warps)
    else:
        p_row = s_row.float() if sum_mode else s_row.float() @ u.float()
        p_col = s_col.float() if sum_mode else s_col.float() @ v.float()
        sel[:, 0] = p_row.topk(k, dim=-1).indices
        sel[:, 1] = p_col.topk(k, dim=-1).indices
    _grid_kernel[(rows, splits)](s_row, s_col, cores, sel, ckey, cf, n, k, m, RANK=rank,
                                 HC=h_c, SUM_MODE=sum_mode, CHUNK=chunk, M_PAD=m_pad,
                                 num_warps=8 if chunk >= 4096 else 4)
    ncand = splits * m_pad
    fblock = triton.next_power_of_2(ncand)
    _final_kernel[(rows,)](s_row, s_col, cores, sel, ckey, cf, tmp, out_s, out_a, n, k, m,
                           ncand, RANK=rank, HC=h_c, SUM_MODE=sum_mode, BLOCK=fblock,
                           M_PAD=m_pad, num_warps=8 if fblock >= 4096 else 4)
    return out_s, out_a
