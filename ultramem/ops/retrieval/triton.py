"""Triton kernels for product-key / TDQKR retrieval (docs/math.md §2, §3.6-3.8).

Three launches, no ``[.., k, k, h_c]`` intermediate; scores are fp32 inside (inputs fp32 or
bf16) and every selection is the integer radix select of :mod:`.select`:

1. :func:`_phase1_kernel`, grid ``(R, 2)`` (R = rows = tokens x heads, one program per side):
   phase-1 score ``S @ u`` (rank-1 Tucker approximation; the raw score for product keys) over
   all N keys in registers, exact top-k, compaction of the k winners. Writes ``sel [R, 2, k]``
   (key ids in id order: the set matters, not its order). The keys are held in two
   power-of-two pieces where that saves at least :data:`SPLIT_MIN_SAVING` of the padded block
   (:func:`_pieces`).
2. :func:`_grid_kernel`, grid ``(R, SPLITS)``: each program rescores one chunk of the k x k
   candidate grid exactly (``sum_c S_row[a]^T C_c S_col[b]``, or ``s_a + s_b``) and keeps its
   local top-m. Writes ``SPLITS x m_pad`` candidates.
3. :func:`_final_kernel`, grid ``(R,)``: the global top-m among the candidates, sorted
   (``tl.sort`` of packed ``(score, flat)`` 64-bit keys), the exact per-core scores and the
   addresses ``a*N + b``.

Ties: phase 1 takes each side's top-k with ties to the lower key id, the grid the top-m by
summed score with ties to the lower flat index ``a_slot * k + b_slot``; the winners come out by
summed score, descending (equal scores: higher flat index first). :func:`ive_address` is the
IVE address map (§3.6) and :func:`ring_address` UltraMemV2's ring map (§4.4) in one launch each.
Measurements behind the constants: docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ultramem.ops.retrieval.select import select, select_rows, ukey32

MAX_N = 16384  # phase 1 keeps all N scores of a row in registers
SPLIT_MIN_SAVING = 0.25  # two key pieces only when they save a quarter of the padded block
GRID_CHUNK = 4096  # candidates per grid program for many rows (throughput)
GRID_CHUNK_FEW = 512  # few rows: more programs a row (32 -> 27 us at 2-128 rows on H200)
GRID_FEW_MAX_ROWS = 256  # rows up to which GRID_CHUNK_FEW applies (measured up to 128)
GRID_FEW_PER_M = 8  # few rows: chunks of at least 8 m_pad candidates (m 128: 1024 beats 512 by
# 2-5 us at 1 / 8 / 64 rows, fewer candidates for the final kernel; v2-chain-h200.json)


@triton.jit
def _p1_keys(srow_ptr, scol_ptr, u_ptr, v_ptr, row, side, offs, N, RANK: tl.constexpr):
    """uint32 keys (0 past N) of the phase-1 scores ``S_row @ u`` (side 0) / ``S_col @ v``
    (side 1) of keys ``offs``; ``side [1, 1(, 1)]`` broadcast against ``offs``. Inputs of any
    float dtype, fp32 math."""
    mask = (offs + side * 0) < N  # broadcast to the tile's shape
    base = tl.where(side == 0, srow_ptr, scol_ptr) + (row * N + offs) * RANK
    w_ptr = tl.where(side == 0, u_ptr, v_ptr)
    p = tl.zeros(mask.shape, dtype=tl.float32)
    for t in tl.static_range(RANK):
        p += tl.load(w_ptr + t).to(tl.float32) * tl.load(base + t, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, ukey32(p), tl.zeros(mask.shape, dtype=tl.uint32))


@triton.jit
def _phase1_kernel(srow_ptr, scol_ptr, u_ptr, v_ptr, sel_ptr, N, K,
                   RANK: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                   KCH: tl.constexpr):
    """Phase 1, grid ``(R, 2)``: one row and side a program -> ``sel [row, side, :K]``, the
    side's top-K key ids (ties to the lower id) in id order. Keys in one block ``[0, BLOCK_A)``
    (``BLOCK_B = 0``), or in two pieces ``[0, BLOCK_A)`` (held as ``[1, BLOCK_A / BLOCK_B,
    BLOCK_B]``) and ``[BLOCK_A, BLOCK_A + BLOCK_B)`` (``[1, 1, BLOCK_B]``)."""
    row = tl.program_id(0).to(tl.int64)
    side = tl.program_id(1) + tl.zeros([1, 1], dtype=tl.int32)
    W: tl.constexpr = BLOCK_B if BLOCK_B > 0 else BLOCK_A  # the pieces' shared last axis
    side3 = side[:, :, None]
    # loaded as [1, BLOCK] and reshaped: the load's layout (threads along the keys) carries
    # over to [1, J, W] (a load built 3-D gets threads along J: a layout conversion a pass)
    key_a = tl.reshape(_p1_keys(srow_ptr, scol_ptr, u_ptr, v_ptr, row, side,
                                tl.arange(0, BLOCK_A)[None, :], N, RANK), [1, BLOCK_A // W, W])
    offs_a = tl.arange(0, BLOCK_A // W)[None, :, None] * W + tl.arange(0, W)[None, None, :]
    if BLOCK_B > 0:
        offs_b = BLOCK_A + tl.arange(0, BLOCK_B)[None, None, :]
        key_b = _p1_keys(srow_ptr, scol_ptr, u_ptr, v_ptr, row, side3, offs_b, N, RANK)
    else:
        offs_b = offs_a
        key_b = key_a
    take_a, pos_a, take_b, pos_b = select_rows(key_a, key_b, K, KCH, BLOCK_B > 0)
    out = sel_ptr + (row * 2 + side3) * K
    tl.store(out + pos_a, offs_a + tl.zeros_like(pos_a), mask=take_a)
    if BLOCK_B > 0:
        tl.store(out + pos_b, offs_b + tl.zeros_like(pos_b), mask=take_b)


@triton.jit
def _exact(srow_ptr, scol_ptr, c_ptr, row, ia, ib, va, vb, N,
           RANK: tl.constexpr, HC: tl.constexpr, CORE: tl.constexpr, SUM_MODE: tl.constexpr):
    """Exact grid score of candidates (ia, ib) (valid where ``va`` / ``vb``): core CORE's
    bilinear form, or all cores summed (CORE < 0)."""
    if SUM_MODE:
        s = tl.load(srow_ptr + row * N + ia, mask=va, other=0.0).to(tl.float32)
        s += tl.load(scol_ptr + row * N + ib, mask=vb, other=0.0).to(tl.float32)
    else:
        s = tl.zeros(ia.shape, dtype=tl.float32) + tl.zeros(ib.shape, dtype=tl.float32)
        for t in tl.static_range(RANK):
            ra = tl.load(srow_ptr + (row * N + ia) * RANK + t, mask=va, other=0.0).to(tl.float32)
            for w in tl.static_range(RANK):
                cb = tl.load(scol_ptr + (row * N + ib) * RANK + w, mask=vb, other=0.0).to(tl.float32)
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
    """Grid ``(R, SPLITS)``: the local top-m of one CHUNK of the row's k x k grid."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    nsp = tl.num_programs(1)
    f = sp * CHUNK + tl.arange(0, CHUNK)
    valid = f < K * K
    ia = tl.load(sel_ptr + row * 2 * K + f // K, mask=valid, other=0).to(tl.int64)
    ib = tl.load(sel_ptr + row * 2 * K + K + f % K, mask=valid, other=0).to(tl.int64)
    s = _exact(srow_ptr, scol_ptr, c_ptr, row, ia, ib, valid, valid, N, RANK, HC, -1, SUM_MODE)
    key = tl.where(valid, ukey32(s), tl.zeros([CHUNK], dtype=tl.uint32))
    need = tl.minimum(tl.sum(valid.to(tl.int32), axis=0), M)
    take, pos = select(key, need, M_PAD)
    base = (row * nsp + sp) * M_PAD
    offs_m = tl.arange(0, M_PAD)
    tl.store(ckey_ptr + base + offs_m, tl.zeros([M_PAD], dtype=tl.uint32), mask=offs_m >= need)
    tl.store(ckey_ptr + base + pos, key, mask=take)
    tl.store(cf_ptr + base + pos, f, mask=take)


@triton.jit
def _final_kernel(srow_ptr, scol_ptr, c_ptr, sel_ptr, ckey_ptr, cf_ptr, tmp_ptr,
                  out_s_ptr, out_a_ptr, N, K, M, NCAND,
                  RANK: tl.constexpr, HC: tl.constexpr, SUM_MODE: tl.constexpr,
                  BLOCK: tl.constexpr, M_PAD: tl.constexpr):
    """Grid ``(R,)``: the global top-m of the row's candidates -> sorted by score descending
    (``tl.sort`` of packed 64-bit ``(key, f)`` words through ``tmp [row, M_PAD]``), the exact
    per-core (or summed) scores and ``addr = a*N + b``."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < NCAND
    key = tl.load(ckey_ptr + row * NCAND + offs, mask=mask, other=0)
    f = tl.load(cf_ptr + row * NCAND + offs, mask=mask, other=0).to(tl.int64)
    take, pos = select(key, M, M_PAD)
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
        s = _exact(srow_ptr, scol_ptr, c_ptr, row, ia, ib, mm, mm, N, RANK, HC, -1, SUM_MODE)
        tl.store(out_s_ptr + row * M + offs_m, s.to(out_s_ptr.dtype.element_ty), mask=mm)
    else:
        for c in tl.static_range(HC):
            s = _exact(srow_ptr, scol_ptr, c_ptr, row, ia, ib, mm, mm, N, RANK, HC, c, SUM_MODE)
            tl.store(out_s_ptr + (row * M + offs_m) * HC + c, s.to(out_s_ptr.dtype.element_ty),
                     mask=mm)


@triton.jit
def _ive_kernel(addr_ptr, perm_ptr, row_ptr, blk_ptr, n_addr, num_rows, BLOCK: tl.constexpr):
    """§3.6: ``pi = perm[addr]``, ``row = pi mod P``, ``block = pi div P`` (int64)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_addr
    a = tl.load(addr_ptr + offs, mask=mask, other=0)
    pi = tl.load(perm_ptr + a, mask=mask, other=0).to(tl.int64)
    blk = pi // num_rows
    tl.store(row_ptr + offs, pi - blk * num_rows, mask=mask)
    tl.store(blk_ptr + offs, blk, mask=mask)


@triton.jit
def _ring_kernel(addr_ptr, perm_ptr, off_ptr, local_ptr, row_ptr, n_addr, window, pool_rows,
                 HAS_PERM: tl.constexpr, BLOCK: tl.constexpr):
    """UltraMemV2 §4.4: ``a = perm[addr]`` (``HAS_PERM``), ``local = a mod P'``, ``row = (local
    + offset) mod P_all`` (floor modulo: the centred ring's offset may be negative)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_addr
    a = tl.load(addr_ptr + offs, mask=mask, other=0).to(tl.int64)
    if HAS_PERM:
        a = tl.load(perm_ptr + a, mask=mask, other=0).to(tl.int64)
    local = a % window
    row = (local + tl.load(off_ptr).to(tl.int64)) % pool_rows
    row = tl.where(row < 0, row + pool_rows, row)
    tl.store(local_ptr + offs, local, mask=mask)
    tl.store(row_ptr + offs, row, mask=mask)


def _address_map(kernel, addr, before: tuple, after: tuple, **meta) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch an elementwise address kernel ``kernel(addr, *before, out_a, out_b, n, *after)``
    over ``addr`` -> two int64 tensors shaped like ``addr``."""
    addr = addr.contiguous()
    out_a = torch.empty(addr.shape, device=addr.device, dtype=torch.int64)
    out_b = torch.empty_like(out_a)
    n = addr.numel()
    if n:
        block = min(1024, triton.next_power_of_2(n))
        kernel[(triton.cdiv(n, block),)](addr, *before, out_a, out_b, n, *after, BLOCK=block,
                                         num_warps=4 if block >= 512 else 1, **meta)
    return out_a, out_b


def ring_address(addr, perm, window, offset, pool_rows):
    """``(local, row)`` int64, each shaped like ``addr``; ``offset`` a one-element tensor."""
    return _address_map(_ring_kernel, addr, (perm if perm is not None else addr, offset), (window, pool_rows),
                        HAS_PERM=perm is not None)


def ive_address(addr, perm, num_rows):
    """``(row, block)`` int64, each shaped like ``addr``."""
    return _address_map(_ive_kernel, addr, (perm,), (num_rows,))


def supported(n: int, k: int, m: int) -> bool:
    """Shapes the kernels handle (else the dispatcher takes the reference)."""
    return n <= MAX_N and 0 < k <= n and 0 < m <= k * k and m <= 1024 and k * k < 2**31


def _pieces(n: int, k: int) -> tuple[int, int]:
    """``(BLOCK_A, BLOCK_B)``: the keys ``[0, n)`` of a row in one power-of-two block
    (``BLOCK_B = 0``) or in two power-of-two pieces ``BLOCK_A = next_pow2(n) / 2`` and
    ``BLOCK_B = next_pow2(n - BLOCK_A)`` where that saves at least :data:`SPLIT_MIN_SAVING` of
    the padded block (N 2200 -> 2048 + 256; N 3584 -> one block of 4096). The pieces share
    their last axis ``W = BLOCK_B`` and the select's lower bound needs ``W >= next_pow2(k)``."""
    full = triton.next_power_of_2(n)
    if full == n:
        return full, 0
    a = full // 2
    b = max(triton.next_power_of_2(n - a), triton.next_power_of_2(k))  # the bound: W >= KCH
    return (full, 0) if a + b > (1 - SPLIT_MIN_SAVING) * full else (a, b)


def phase1_select(s_row, s_col, u, v, k, sum_mode):
    """Phase 1 alone: ``sel [R, 2, k]`` int32, each side's top-k key ids by ``S_row @ u`` /
    ``S_col @ v`` (the raw scores in sum mode), ties to the lower id, in id order."""
    rows, n = s_row.shape[0], s_row.shape[1]
    sel = torch.empty(rows, 2, k, device=s_row.device, dtype=torch.int32)
    if sum_mode:
        u = v = torch.ones(1, device=s_row.device, dtype=torch.float32)
    if rows:
        ba, bb = _pieces(n, k)
        warps = 8 if ba + bb >= 4096 and rows < 4096 else 4  # latency for few rows (H200)
        _phase1_kernel[(rows, 2)](s_row, s_col, u, v, sel, n, k,
                                  RANK=1 if sum_mode else s_row.shape[2], BLOCK_A=ba,
                                  BLOCK_B=bb, KCH=triton.next_power_of_2(k), num_warps=warps)
    return sel


def topk(s_row, s_col, cores, u, v, k, m, sum_mode):
    """``s_row, s_col [R, N, r]`` (``[R, N]`` in sum mode) -> ``(scores [R, m(, h_c)], addr
    [R, m])`` in three launches (module docstring)."""
    rows = s_row.shape[0]
    n = s_row.shape[1]
    rank = 1 if sum_mode else s_row.shape[2]
    h_c = 1 if sum_mode else cores.shape[0]
    dev = s_row.device
    m_pad = triton.next_power_of_2(m)
    out_s = torch.empty((rows, m) if sum_mode else (rows, m, h_c), device=dev, dtype=s_row.dtype)
    out_a = torch.empty(rows, m, device=dev, dtype=torch.int64)
    if rows == 0:
        return out_s, out_a
    if sum_mode:
        u = v = cores = torch.ones(1, device=dev, dtype=torch.float32)
    sel = phase1_select(s_row, s_col, u, v, k, sum_mode)
    kk = k * k
    gmax = max(GRID_CHUNK_FEW, GRID_FEW_PER_M * m_pad) if rows <= GRID_FEW_MAX_ROWS else GRID_CHUNK
    chunk = max(min(triton.next_power_of_2(kk), gmax), m_pad)
    splits = triton.cdiv(kk, chunk)
    ckey = torch.empty(rows, splits, m_pad, device=dev, dtype=torch.uint32)
    cf = torch.empty(rows, splits, m_pad, device=dev, dtype=torch.int32)
    _grid_kernel[(rows, splits)](s_row, s_col, cores, sel, ckey, cf, n, k, m, RANK=rank, HC=h_c,
                                 SUM_MODE=sum_mode, CHUNK=chunk, M_PAD=m_pad,
                                 num_warps=8 if chunk >= 4096 else 4)
    ncand = splits * m_pad
    fblock = triton.next_power_of_2(ncand)
    tmp = torch.empty(rows, m_pad, device=dev, dtype=torch.int64)
    _final_kernel[(rows,)](s_row, s_col, cores, sel, ckey, cf, tmp, out_s, out_a, n, k, m, ncand,
                           RANK=rank, HC=h_c, SUM_MODE=sum_mode, BLOCK=fblock, M_PAD=m_pad,
                           num_warps=8 if fblock >= 4096 else 4)
    return out_s, out_a
