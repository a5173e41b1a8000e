"""Triton kernels for product-key / TDQKR retrieval (SPEC §2, §3.6-3.8, §7 fused retrieval).

Two paths, no ``[.., k, k, h_c]`` intermediate in either; scores are fp32 inside (inputs fp32 or
bf16), a float becomes an order-preserving uint32 key (:func:`_ukey32`, 0 = invalid) so that
every selection is an integer radix select (:func:`_select_rows`).

**One launch per call (few rows, up to** :data:`FUSED_MAX_ROWS` **rows; off by default, slower on H200):**
:func:`_fused_kernel`, grid ``(R,)``, one program per row does phase 1 for both sides at once
(a ``[2, BLOCK]`` tile or two pieces, one threshold per side, both sides' counts in one
reduction a pass), the k x k grid as a ``[KP, KP]`` tile
(``KP = next_pow2(k)``, ``KP^2 <=`` :data:`FUSED_MAX_GRID`), the top-m, the sort of the m
winners, the per-core scores and addresses, and optionally the IVE address map (SPEC §3.6).
At decode a row's latency is the serial chain of radix passes, reductions and barriers: this
path pays one launch instead of three (four with the address map) and one phase-1 chain for
both sides instead of one per program. See the kernel's docstring for the limits.

**Three launches (many rows, or shapes past the fused kernel's limits):**

1. :func:`_phase1_kernel`, grid ``(R, 2)`` (R = rows = tokens x heads, one program per side):
   phase-1 score ``S @ u`` (rank-1 Tucker approximation; the raw score for product keys) over
   all N keys in registers, exact top-k by radix select, compaction of the k winners with a
   prefix sum. Writes ``sel [R, 2, k]`` (key ids, in id order: the set matters, not its
   order). The keys are held in two power-of-two pieces when that saves at least
   :data:`SPLIT_MIN_SAVING` of the padded block (:func:`_pieces`; N 2200 -> 2048 + 256
   instead of 4096: every pass compares 44 % fewer keys); :data:`PHASE1_SPLIT_BLOCK` = False
   keeps one block of ``next_pow2(N)``.
2. :func:`_grid_kernel`, grid ``(R, SPLITS)``: each program takes one chunk of the k x k
   candidate grid (512 candidates for few rows, 4096 for many), rescores it exactly
   (``sum_c S_row[a]^T C_c S_col[b]``, or ``s_a + s_b``), and keeps its local top-m by the same
   radix select. Writes ``SPLITS x m_pad`` candidates.
3. :func:`_final_kernel`, grid ``(R,)``: radix select of the global top-m among the candidates,
   sort of the m winners (``tl.sort`` of packed ``(score, flat)`` 64-bit keys), the exact
   per-core scores and addresses ``a*N + b`` of the winners, optionally the IVE address map.

Optional split phase 1 (``P1_CHUNK > 0``, off by default: it measured no faster at decode):
:func:`_p1_chunk_kernel`, grid ``(R, 2, N / P1_CHUNK)``, local top-k of each chunk of keys,
merged per row by :func:`_p1_merge` at the start of the grid kernel.

Both paths select the same set: phase 1 takes each side's top-k with ties at the k-th value to
the lower key id, the grid takes the top-m by summed score with ties to the lower flat index
``a_slot * k + b_slot`` (slots in key-id order), and the winners are ordered by summed score,
descending (equal scores: higher flat index first). Host functions: :func:`topk`,
:func:`topk_ive`, :func:`ive_address`, :func:`phase1_select`, :func:`supported`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_N = 16384  # phase 1 keeps all N scores of a row in registers
GRID_CHUNK = 4096
PHASE1_KERNEL_MAX_ROWS = 1 << 30  # row count above which phase 1 uses torch.topk (benchmarked)
PHASE1_WARPS = 0  # 0: by N and rows (below); benchmarks/ops.py times 2 / 4 / 8
# Phase 1 over two power-of-two pieces of keys (``_pieces``) instead of one block padded to
# next_pow2(N), where that saves at least SPLIT_MIN_SAVING of the block: N 2200 (151M training
# size) -> 2048 + 256 held as [8, 256] + [1, 256], so each radix pass compares 2304 keys instead
# of 4096, still with one block reduction a pass (the pieces are summed inside each thread
# first). sm_90 PTX of a pass at 4 warps: 137 lines instead of 195 (Triton 3.6), 119 instead of
# 177 (3.9); 91 / 96 registers instead of 168 / 154, no spills (not yet timed). False: one block
# of next_pow2(N), the kernel as before. FUSED_SPLIT_BLOCK: the same for the fused kernel (N
# 3584, the 1.6B decode size, stays one block of 4096 either way: 2048 + 2048 saves nothing).
PHASE1_SPLIT_BLOCK = True
FUSED_SPLIT_BLOCK = True
SPLIT_MIN_SAVING = 0.25
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
# radix select from a lower bound with an early exit (``_select_rows``); False: all 32 passes
SELECT_BOUND = True
# One-launch path (``_fused_kernel``): used for up to FUSED_MAX_ROWS rows (0: never) when
# next_pow2(N) <= FUSED_MAX_BLOCK (both sides' keys in registers: 2 x 4096 at N 3584) and
# next_pow2(k)^2 <= FUSED_MAX_GRID (the k x k grid as one tile: k <= 64); else three launches.
# Off by default: on an H200 (2026-11-22, ops-h200.json, 1.6B decode size) the one launch took
# 25.4 / 25.8 / 26.5 us at B 1 / 8 / 64 (8 warps; 4: 35.6, 16: 27.3) against 19.3 / 19.6 / 24.7
# for the three launches: one program per row does the k x k grid (a [64, 64] tile, 43 % valid)
# and its select alone, where the grid kernel splits it over 4 programs a row. Kept and tested.
FUSED_MAX_ROWS = 0
FUSED_MAX_BLOCK = 4096
FUSED_MAX_GRID = 4096
FUSED_WARPS = 0  # 0: by shape (_fused_warps: 8 at the 1.6B decode size)


@triton.jit
def _ukey32(x):
    """fp32 -> uint32 with the same order (0 only for a NaN pattern: used as 'invalid')."""
    b = x.to(tl.uint32, bitcast=True)
    flip = tl.where((b >> 31) == 1, tl.full(b.shape, 0xFFFFFFFF, tl.uint32),
                    tl.full(b.shape, 0x80000000, tl.uint32))
    return b ^ flip


@triton.jit
def _common_prefix(lb, hi):
    """``(thr, step)``: the bits of ``hi`` above the highest bit where ``lb`` and ``hi`` differ,
    and that bit (0 when they are equal: then ``thr = hi``). Branch-free (a bit smear)."""
    d = lb ^ hi
    d = d | (d >> 1)
    d = d | (d >> 2)
    d = d | (d >> 4)
    d = d | (d >> 8)
    d = d | (d >> 16)  # all ones from the highest differing bit down
    return hi & ~d, tl.where(d == 0, tl.zeros_like(d), (d >> 1) + 1)


@triton.jit
def _count(ka, kb, thr, w, TWO: tl.constexpr, GT: tl.constexpr):
    """Keys ``>= thr`` (``> thr`` with ``GT``) of each row of the pieces ``ka [S, J, W]``, ``kb
    [S, J', W]`` (``thr [S, 1, 1]``), packed as ``sum_s count_s * w_s`` (``w [S, 1, 1]``: 1 and
    65536, so S <= 2 counts of at most 65535 keys come out of ONE block reduction). With
    ``TWO`` the pieces are summed over J (inside each thread: they share W and its layout) and
    added first."""
    if GT:
        x = (ka > thr).to(tl.int32) * w
    else:
        x = (ka >= thr).to(tl.int32) * w
    if TWO:
        if GT:
            xb = (kb > thr).to(tl.int32) * w
        else:
            xb = (kb >= thr).to(tl.int32) * w
        packed = tl.sum(tl.sum(x, axis=1) + tl.sum(xb, axis=1))
    else:
        packed = tl.sum(x)
    return packed


@triton.jit
def _unpack(packed, S: tl.constexpr):
    """The per-row counts ``(c0, c1)`` of a :func:`_count` (``c1 = c0`` when S = 1)."""
    if S == 1:
        c0 = packed
        c1 = packed
    else:
        c0 = packed & 0xFFFF
        c1 = packed >> 16
    return c0, c1


@triton.jit
def _pick(v, i):
    """Element ``i`` of a small vector ``v`` as a scalar."""
    return tl.sum(tl.where(tl.arange(0, v.shape[0]) == i, v, tl.zeros_like(v)))


@triton.jit
def _rank(x):
    """Inclusive prefix sum of ``x [S, J, W]`` (int32) along each row in position order
    ``j * W + w``: a scan along W plus the exclusive prefix of the J partial sums."""
    if x.shape[1] == 1:
        r = tl.cumsum(x, axis=2)
    else:
        tot = tl.sum(x, axis=2)
        r = tl.cumsum(x, axis=2) + (tl.cumsum(tot, axis=1) - tot)[:, :, None]
    return r


@triton.jit
def _take(key, thr, room):
    """Keys ``> thr``, and keys ``== thr`` while their position-order rank is ``<= room``
    (``thr, room [S, 1, 1]``); also the number of keys ``== thr`` of each row ``[S, 1, 1]``."""
    eq = (key == thr).to(tl.int32)
    take = (key > thr) | ((eq != 0) & (_rank(eq) <= room))
    return take, tl.sum(tl.sum(eq, axis=2), axis=1)[:, None, None]


@triton.jit
def _select_rows(ka, kb, need, KCH: tl.constexpr, BOUND: tl.constexpr, TWO: tl.constexpr):
    """Per row (S = 1 or 2 rows) of uint32 keys (0 = invalid): mask and output slot of the
    row's ``need`` largest keys, ties to the lower position. A row's keys are a piece ``ka [S,
    JA, W]`` and, with ``TWO``, a second piece ``kb [S, JB, W]`` after it (position ``j * W +
    w`` within a piece; any powers of two: N need not be padded to one power of two, e.g. N
    2200 as ``[S, 8, 256]`` + ``[S, 1, 256]``); without ``TWO``, ``kb`` is ignored. Counts add
    over the pieces, tie ranks and output slots continue from ``ka`` into ``kb``.
    Returns ``take_a, pos_a, take_b, pos_b`` (``take_b, pos_b`` = ``take_a, pos_a`` without TWO).

    Radix select from the top bit, one threshold per row (scalars ``thr0``, ``thr1``): ``thr``
    grows one bit a pass (a count of ``key >= thr | bit``, both rows' counts packed into one
    block reduction, :func:`_count`) to the largest value with at least ``need`` keys at or
    above it; the loop runs while either row still has a bit to decide. ``BOUND`` (default)
    shortens the chain of passes, which is what a row's latency is made of:

    - a lower bound: the maxima of ``KCH >= need`` disjoint groups of keys (the keys whose W
      index is ``g mod KCH``, over both pieces; ``W >= KCH``) are ``KCH`` distinct keys, so at
      least ``need`` keys are >= their minimum ``lb``; the threshold lies in ``[lb, max]`` and
      the bits above the highest bit where ``lb`` and ``max`` differ are known at once
      (:func:`_common_prefix`; for real scores that skips the sign and exponent bits);
    - an early exit: once a pass counts exactly ``need`` keys at or above the candidate, the
      row's set is found (continuous scores get there about log2(N / need) + a few passes in).

    Without ``BOUND``: all 32 passes. A 2-4-bit-a-pass variant (one ``[2^b, BLOCK]`` count per
    pass) measured 2x slower on H200 (docs/kernels.md).
    """
    S: tl.constexpr = ka.shape[0]
    first = tl.arange(0, S)[:, None, None] == 0
    w = tl.where(first, 1, 65536)  # count packing weights (a second row: the upper 16 bits)
    if BOUND:
        col = tl.max(ka, axis=1)  # [S, W]
        if TWO:
            col = tl.maximum(col, tl.max(kb, axis=1))
        lbs = tl.max(tl.reshape(col, [S, col.shape[1] // KCH, KCH]), axis=1)  # [S, KCH]
        if S == 1:
            thr0, step0 = _common_prefix(tl.min(lbs), tl.max(col))
        else:
            thr_v, step_v = _common_prefix(tl.min(lbs, axis=1), tl.max(col, axis=1))
            thr0, step0 = _pick(thr_v, 0), _pick(step_v, 0)
            thr1, step1 = _pick(thr_v, 1), _pick(step_v, 1)
    else:
        thr0 = tl.full([], 0, tl.uint32)
        step0 = tl.full([], 0x80000000, tl.uint32)
        thr1, step1 = thr0, step0
    if S == 1:
        thr1, step1 = thr0, tl.full([], 0, tl.uint32)  # unused
    go = (step0 | step1) != 0
    # the count is inlined (not _count): the interpreter pays about 1 ms a nested jit call
    while go:
        if S == 1:
            t = thr0 | step0
            x = (ka >= t).to(tl.int32)
        else:
            t = tl.where(first, thr0 | step0, thr1 | step1)
            x = (ka >= t).to(tl.int32) * w
        if TWO:
            if S == 1:
                xb = (kb >= t).to(tl.int32)
            else:
                xb = (kb >= t).to(tl.int32) * w
            cnt0 = tl.sum(tl.sum(x, axis=1) + tl.sum(xb, axis=1))
        else:
            cnt0 = tl.sum(x)
        if S > 1:
            cnt1 = cnt0 >> 16
            cnt0 = cnt0 & 0xFFFF
            thr1 = tl.where(cnt1 >= need, thr1 | step1, thr1)
            if BOUND:
                step1 = tl.where(cnt1 == need, 0, step1 >> 1)
            else:
                step1 = step1 >> 1
        thr0 = tl.where(cnt0 >= need, thr0 | step0, thr0)
        if BOUND:  # early exit: exactly `need` keys at or above the candidate
            step0 = tl.where(cnt0 == need, 0, step0 >> 1)
        else:
            step0 = step0 >> 1
        go = (step0 | step1) != 0
    thr = tl.where(first, thr0, thr1)  # [S, 1, 1]
    n0, n1 = _unpack(_count(ka, kb, thr, w, TWO, False), S)
    if (n0 != need) | (n1 != need):  # ties at thr (never after an early exit)
        g0, g1 = _unpack(_count(ka, kb, thr, w, TWO, True), S)
        room = need - tl.where(first, g0, g1)  # keys == thr fill the slots left, by position
        take_a, n_eq = _take(ka, thr, room)
        room_b = room - n_eq  # tie slots left for the second piece
    else:
        take_a = ka >= thr
        room_b = tl.zeros_like(w)
    pos_a = _rank(take_a.to(tl.int32)) - 1
    if TWO:
        if (n0 != need) | (n1 != need):
            take_b, _n = _take(kb, thr, room_b)
        else:
            take_b = kb >= thr
        n_a = tl.sum(tl.sum(take_a.to(tl.int32), axis=2), axis=1)[:, None, None]
        pos_b = n_a + _rank(take_b.to(tl.int32)) - 1
    else:
        take_b = take_a
        pos_b = pos_a
    return take_a, pos_a, take_b, pos_b


@triton.jit
def _select(key, need, KCH: tl.constexpr, BOUND: tl.constexpr):
    """:func:`_select_rows` for one 1-D block of keys: ``(take, pos)`` shaped like ``key``."""
    k3 = key[None, None, :]
    take, pos, _tb, _pb = _select_rows(k3, k3, need, KCH, BOUND, False)
    return tl.reshape(take, key.shape), tl.reshape(pos, key.shape)


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
def _p1_keys(srow_ptr, scol_ptr, u_ptr, v_ptr, row, side, offs, N, RANK: tl.constexpr):
    """uint32 keys (0 past N) of the phase-1 scores ``S_row @ u`` (side 0) / ``S_col @ v``
    (side 1) of keys ``offs``; ``side`` is a scalar (one side a program) or a ``[S, 1(, 1)]``
    tensor broadcast against ``offs [1, (1,) B]`` (both sides in one tile). Inputs of any float
    dtype, fp32 math."""
    mask = (offs + side * 0) < N  # broadcast to the tile's shape
    base = tl.where(side == 0, srow_ptr, scol_ptr) + (row * N + offs) * RANK
    w_ptr = tl.where(side == 0, u_ptr, v_ptr)
    p = tl.zeros(mask.shape, dtype=tl.float32)
    for t in tl.static_range(RANK):
        p += tl.load(w_ptr + t).to(tl.float32) * tl.load(base + t, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, _ukey32(p), tl.zeros(mask.shape, dtype=tl.uint32))


@triton.jit
def _phase1_rows(srow_ptr, scol_ptr, u_ptr, v_ptr, sel_ptr, row, side, N, K,
                 RANK: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                 KCH: tl.constexpr, BOUND: tl.constexpr):
    """Phase 1 of one row for the sides ``side [S, 1]``: each side's top-K key ids (ties to
    the lower id) -> ``sel [row, side, :K]`` in id order. Keys in one block ``[0, BLOCK_A)``
    (``BLOCK_B = 0``), or in two pieces ``[0, BLOCK_A)`` (held as ``[S, BLOCK_A / BLOCK_B,
    BLOCK_B]``) and ``[BLOCK_A, BLOCK_A + BLOCK_B)`` (``[S, 1, BLOCK_B]``)."""
    W: tl.constexpr = BLOCK_B if BLOCK_B > 0 else BLOCK_A  # the pieces' shared last axis
    S: tl.constexpr = side.shape[0]
    side3 = side[:, :, None]
    # loaded as [S, BLOCK] and reshaped: the load's layout (threads along the keys) carries
    # over to [S, J, W] with J inside each thread (Triton 3.6 picks a layout with threads
    # along J for a load built 3-D, which costs a layout conversion every pass)
    key_a = tl.reshape(_p1_keys(srow_ptr, scol_ptr, u_ptr, v_ptr, row, side,
                                tl.arange(0, BLOCK_A)[None, :], N, RANK), [S, BLOCK_A // W, W])
    offs_a = tl.arange(0, BLOCK_A // W)[None, :, None] * W + tl.arange(0, W)[None, None, :]
    if BLOCK_B > 0:
        offs_b = BLOCK_A + tl.arange(0, BLOCK_B)[None, None, :]
        key_b = _p1_keys(srow_ptr, scol_ptr, u_ptr, v_ptr, row, side3, offs_b, N, RANK)
    else:
        offs_b = offs_a
        key_b = key_a
    take_a, pos_a, take_b, pos_b = _select_rows(key_a, key_b, K, KCH, BOUND, BLOCK_B > 0)
    out = sel_ptr + (row * 2 + side3) * K
    tl.store(out + pos_a, offs_a + tl.zeros_like(pos_a), mask=take_a)
    if BLOCK_B > 0:
        tl.store(out + pos_b, offs_b + tl.zeros_like(pos_b), mask=take_b)


@triton.jit
def _p1_chunk_kernel(srow_ptr, scol_ptr, u_ptr, v_ptr, ck_ptr, ci_ptr, N, K, NCHUNK,
                     RANK: tl.constexpr, CHUNK: tl.constexpr):
    """Stage A: top-K of one CHUNK of one row's phase-1 scores -> K (key, id) candidates."""
    row = tl.program_id(0).to(tl.int64)
    side = tl.program_id(1)
    ch = tl.program_id(2)
    offs = ch * CHUNK + tl.arange(0, CHUNK)
    mask = offs < N
    key = _p1_keys(srow_ptr, scol_ptr, u_ptr, v_ptr, row, side, offs, N, RANK)
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
                   RANK: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                   KCH: tl.constexpr, BOUND: tl.constexpr):
    """Phase 1, grid ``(R, 2)``: one row and side a program, keys in one block
    (``BLOCK_B = 0``, ``BLOCK_A = next_pow2(N)``) or two power-of-two pieces (:func:`_pieces`)."""
    row = tl.program_id(0).to(tl.int64)
    side = tl.program_id(1) + tl.zeros([1, 1], dtype=tl.int32)
    _phase1_rows(srow_ptr, scol_ptr, u_ptr, v_ptr, sel_ptr, row, side, N, K,
                 RANK, BLOCK_A, BLOCK_B, KCH, BOUND)


@triton.jit
def _exact(srow_ptr, scol_ptr, c_ptr, row, ia, ib, va, vb, N,
           RANK: tl.constexpr, HC: tl.constexpr, CORE: tl.constexpr, SUM_MODE: tl.constexpr):
    """Exact grid score of candidates (ia, ib) (valid where ``va`` / ``vb``): core CORE's
    bilinear form, or all cores summed (CORE < 0). ``ia`` and ``ib`` have the same shape (a
    flat list of candidates) or broadcast (``[KP, 1]`` x ``[1, KP]``: the whole grid as a tile,
    each side's scores loaded once)."""
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
    s = _exact(srow_ptr, scol_ptr, c_ptr, row, ia, ib, valid, valid, N, RANK, HC, -1, SUM_MODE)
    key = tl.where(valid, _ukey32(s), tl.zeros([CHUNK], dtype=tl.uint32))
    need = tl.minimum(tl.sum(valid.to(tl.int32), axis=0), M)
    take, pos = _select(key, need, M_PAD, BOUND)
    base = (row * nsp + sp) * M_PAD
    offs_m = tl.arange(0, M_PAD)
    tl.store(ckey_ptr + base + offs_m, tl.zeros([M_PAD], dtype=tl.uint32), mask=offs_m >= need)
    tl.store(ckey_ptr + base + pos, key, mask=take)
    tl.store(cf_ptr + base + pos, f, mask=take)


@triton.jit
def _ive_map(perm_ptr, addr, mask, num_rows, row_ptr, blk_ptr):
    """SPEC §3.6: ``pi = perm[addr]``, ``row = pi mod P``, ``block = pi div P`` (int64)."""
    pi = tl.load(perm_ptr + addr, mask=mask, other=0).to(tl.int64)
    blk = pi // num_rows
    tl.store(row_ptr, pi - blk * num_rows, mask=mask)
    tl.store(blk_ptr, blk, mask=mask)


@triton.jit
def _finish(srow_ptr, scol_ptr, c_ptr, sel_ptr, tmp_ptr, out_s_ptr, out_a_ptr, perm_ptr,
            out_row_ptr, out_blk_ptr, row, key, f, take, pos, N, K, M, P,
            RANK: tl.constexpr, HC: tl.constexpr, SUM_MODE: tl.constexpr,
            M_PAD: tl.constexpr, IVE: tl.constexpr):
    """The m selected candidates (``take``, slots ``pos``; ``key`` their uint32 summed score,
    ``f`` their int64 flat grid index ``a_slot * K + b_slot``) -> sorted by score descending
    (``tl.sort`` of packed 64-bit ``(key, f)`` words through ``tmp [row, M_PAD]``), the exact
    per-core (or summed) scores, ``addr = a*N + b`` and, with ``IVE``, the address map."""
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
    addr = ia * N + ib
    tl.store(out_a_ptr + row * M + offs_m, addr, mask=mm)
    if IVE:
        _ive_map(perm_ptr, addr, mm, P, out_row_ptr + row * M + offs_m,
                 out_blk_ptr + row * M + offs_m)
    if SUM_MODE:
        s = _exact(srow_ptr, scol_ptr, c_ptr, row, ia, ib, mm, mm, N, RANK, HC, -1, SUM_MODE)
        tl.store(out_s_ptr + row * M + offs_m, s.to(out_s_ptr.dtype.element_ty), mask=mm)
    else:
        for c in tl.static_range(HC):
            s = _exact(srow_ptr, scol_ptr, c_ptr, row, ia, ib, mm, mm, N, RANK, HC, c, SUM_MODE)
            tl.store(out_s_ptr + (row * M + offs_m) * HC + c, s.to(out_s_ptr.dtype.element_ty),
                     mask=mm)


@triton.jit
def _final_kernel(srow_ptr, scol_ptr, c_ptr, sel_ptr, ckey_ptr, cf_ptr, tmp_ptr,
                  out_s_ptr, out_a_ptr, perm_ptr, out_row_ptr, out_blk_ptr, N, K, M, NCAND, P,
                  RANK: tl.constexpr, HC: tl.constexpr, SUM_MODE: tl.constexpr,
                  BLOCK: tl.constexpr, M_PAD: tl.constexpr, BOUND: tl.constexpr,
                  IVE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < NCAND
    key = tl.load(ckey_ptr + row * NCAND + offs, mask=mask, other=0)
    f = tl.load(cf_ptr + row * NCAND + offs, mask=mask, other=0).to(tl.int64)
    take, pos = _select(key, M, M_PAD, BOUND)
    _finish(srow_ptr, scol_ptr, c_ptr, sel_ptr, tmp_ptr, out_s_ptr, out_a_ptr, perm_ptr,
            out_row_ptr, out_blk_ptr, row, key, f, take, pos, N, K, M, P,
            RANK, HC, SUM_MODE, M_PAD, IVE)


@triton.jit
def _fused_kernel(srow_ptr, scol_ptr, c_ptr, u_ptr, v_ptr, sel_ptr, tmp_ptr,
                  out_s_ptr, out_a_ptr, perm_ptr, out_row_ptr, out_blk_ptr, N, K, M, P,
                  RANK: tl.constexpr, HC: tl.constexpr, SUM_MODE: tl.constexpr,
                  BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, KCH: tl.constexpr,
                  KP: tl.constexpr, M_PAD: tl.constexpr, BOUND: tl.constexpr,
                  IVE: tl.constexpr):
    """The whole retrieval of one row in one program, grid ``(R,)`` (the decode path).

    Why: at decode (a few rows) the three-launch path is latency: serial radix passes, block
    reductions and barriers, plus launch gaps (18 us + 1.7 us for the address map at the 1.6B
    decode size on H200). Here one program per row does:

    1. phase 1 for both sides at once (``_phase1_rows`` on a ``[2, BLOCK_A (+ BLOCK_B)]`` tile,
       two pieces as in ``_phase1_kernel`` with FUSED_SPLIT_BLOCK, one radix threshold per
       side and both sides' counts packed into one block reduction a pass, so one chain of
       passes serves both sides), the k winners' ids per side to ``sel [row, 2, K]`` and back
       after a barrier;
    2. the k x k grid as one ``[KP, KP]`` tile (``KP = next_pow2(K)``): each side's selected
       scores are loaded once (``[KP, r]``) and broadcast, the exact score summed over cores
       is computed the same way as in ``_grid_kernel`` (bitwise the same values), and the
       top-m of the flattened tile is taken by the radix select, ties to the lower flat index
       ``a_slot * K + b_slot`` (position order of the tile), as the three-launch path does;
    3. ``_finish``, shared with ``_final_kernel``: the sort of the m winners, the exact
       per-core scores, ``addr = a*N + b`` and, with ``IVE``, ``row, block = divmod(perm[addr],
       P)``.

    Limits (host: ``_fused_applies``): both sides' N keys in registers (``BLOCK_A + BLOCK_B <=
    FUSED_MAX_BLOCK``, 4096: 2 x 32 keys a thread at 8 warps), ``KP^2 <= FUSED_MAX_GRID``
    (4096: k <= 64; k = 42 fills 43 % of the tile, which was judged cheaper than gathering
    every flat candidate's scores from memory as ``_grid_kernel`` does: not measured), and
    ``m <= KP^2``; else the three launches. Scratch: ``sel [R, 2, K]`` int32, ``tmp [R,
    M_PAD]`` int64. sm_90 at the 1.6B decode size (N 3584, k = m = 42, r = h_c = 2, 8 warps):
    112 registers under Triton 3.9, 206 under 3.6, no spills (16 warps: 92 / 105; 4 warps
    spill under 3.6); a radix pass is 142 / 173 lines of PTX with one block reduction.
    """
    row = tl.program_id(0).to(tl.int64)
    _phase1_rows(srow_ptr, scol_ptr, u_ptr, v_ptr, sel_ptr, row, tl.arange(0, 2)[:, None], N, K,
                 RANK, BLOCK_A, BLOCK_B, KCH, BOUND)
    tl.debug_barrier()
    slot = tl.arange(0, KP)
    sv = slot < K
    ia = tl.load(sel_ptr + row * 2 * K + slot, mask=sv, other=0).to(tl.int64)
    ib = tl.load(sel_ptr + row * 2 * K + K + slot, mask=sv, other=0).to(tl.int64)
    s = _exact(srow_ptr, scol_ptr, c_ptr, row, ia[:, None], ib[None, :], sv[:, None], sv[None, :],
               N, RANK, HC, -1, SUM_MODE)
    key = tl.where(sv[:, None] & sv[None, :], _ukey32(s), tl.zeros([KP, KP], dtype=tl.uint32))
    key = tl.reshape(key, [KP * KP])
    g = tl.arange(0, KP * KP)
    f = ((g // KP) * K + g % KP).to(tl.int64)
    take, pos = _select(key, M, M_PAD, BOUND)
    _finish(srow_ptr, scol_ptr, c_ptr, sel_ptr, tmp_ptr, out_s_ptr, out_a_ptr, perm_ptr,
            out_row_ptr, out_blk_ptr, row, key, f, take, pos, N, K, M, P,
            RANK, HC, SUM_MODE, M_PAD, IVE)


@triton.jit
def _ive_kernel(addr_ptr, perm_ptr, row_ptr, blk_ptr, n_addr, num_rows, BLOCK: tl.constexpr):
    """``row, block = divmod(perm[addr], P)`` (SPEC §3.6) in one launch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_addr
    a = tl.load(addr_ptr + offs, mask=mask, other=0)
    _ive_map(perm_ptr, a, mask, num_rows, row_ptr + offs, blk_ptr + offs)


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


def _pieces(n: int, k: int, split: bool) -> tuple[int, int]:
    """``(BLOCK_A, BLOCK_B)``: the keys ``[0, n)`` of a row in one power-of-two block
    (``BLOCK_B = 0``) or, with ``split``, in two power-of-two pieces ``BLOCK_A = next_pow2(n) /
    2`` and ``BLOCK_B = next_pow2(n - BLOCK_A)`` where that saves at least
    :data:`SPLIT_MIN_SAVING` of the padded block (N 2200 -> 2048 + 256; N 3584 -> one block of
    4096, since 2048 + 2048 saves nothing). The pieces share their last axis ``W = BLOCK_B``
    (``BLOCK_A`` is held as ``[BLOCK_A / W, W]``), and the select's lower bound needs ``W >=
    next_pow2(k)``, so ``BLOCK_B`` is at least that."""
    full = triton.next_power_of_2(n)
    if not split or full == n:
        return full, 0
    a = full // 2
    b = max(triton.next_power_of_2(n - a), triton.next_power_of_2(k))  # the bound: W >= KCH
    return (full, 0) if a + b > (1 - SPLIT_MIN_SAVING) * full else (a, b)


def _fused_applies(rows: int, n: int, k: int, m: int) -> bool:
    """Whether :func:`_fused_kernel` takes this call (see its docstring for the limits)."""
    ba, bb = _pieces(n, k, FUSED_SPLIT_BLOCK)
    kp = triton.next_power_of_2(k)
    return (rows <= FUSED_MAX_ROWS and ba + bb <= FUSED_MAX_BLOCK and kp * kp <= FUSED_MAX_GRID
            and m <= kp * kp)


def _fused_warps(keys: int, grid: int) -> int:
    """Warps of the fused kernel: by the larger of its two tiles (``2 x keys`` phase-1 keys,
    ``grid`` candidates); :data:`FUSED_WARPS` overrides."""
    if FUSED_WARPS:
        return FUSED_WARPS
    e = max(2 * keys, grid)
    return 8 if e >= 4096 else 4 if e >= 1024 else 2


def _launch_phase1(s_row, s_col, u, v, sel, k, rank):
    """Phase 1 by :func:`_phase1_kernel` into ``sel [R, 2, k]``."""
    rows, n = s_row.shape[0], s_row.shape[1]
    ba, bb = _pieces(n, k, PHASE1_SPLIT_BLOCK)
    # measured on H200 (one block): 8 warps best for a few rows (latency), 4 for many (throughput)
    warps = PHASE1_WARPS or (8 if ba + bb >= 4096 and rows < 4096 else 4)
    _phase1_kernel[(rows, 2)](s_row, s_col, u, v, sel, n, k, RANK=rank, BLOCK_A=ba, BLOCK_B=bb,
                              KCH=triton.next_power_of_2(k), BOUND=SELECT_BOUND,
                              num_warps=warps)


def phase1_select(s_row, s_col, u, v, k, sum_mode):
    """Phase 1 alone (tests, benchmarks): ``sel [R, 2, k]`` int32, each side's top-k key ids by
    ``S_row @ u`` / ``S_col @ v`` (the raw scores in sum mode), ties to the lower id, in id
    order, by :func:`_phase1_kernel` (one block or two pieces per :data:`PHASE1_SPLIT_BLOCK`)."""
    rows = s_row.shape[0]
    sel = torch.empty(rows, 2, k, device=s_row.device, dtype=torch.int32)
    if sum_mode:
        u = v = torch.ones(1, device=s_row.device, dtype=torch.float32)
    if rows:
        _launch_phase1(s_row, s_col, u, v, sel, k, 1 if sum_mode else s_row.shape[2])
    return sel


def topk(s_row, s_col, cores, u, v, k, m, sum_mode, phase1=None, path=None):
    """``s_row, s_col [R, N, r]`` (``[R, N]`` in sum mode) -> ``(scores [R, m(, h_c)], addr [R, m])``.

    ``path``: ``"fused"`` (one launch, :func:`_fused_kernel`; ValueError where it does not
    apply), ``"launches"`` (phase 1, grid and final kernels), ``None`` = fused where it applies
    (``rows <= FUSED_MAX_ROWS`` and the kernel's limits), else launches. Both select the same
    set in the same order.

    ``phase1`` (the launches path): ``"split"`` (chunked radix select over many programs per
    row, then a merge in the grid kernel), ``"kernel"`` (one program per row and side, radix
    select in registers), ``"torch"`` (``torch.topk``), ``None`` = by row count
    (:data:`P1_SPLIT_MAX_ROWS`, :data:`PHASE1_KERNEL_MAX_ROWS`).
    """
    out = _topk(s_row, s_col, cores, u, v, k, m, sum_mode, phase1, path, None, 0)
    return out[0], out[1]


def topk_ive(s_row, s_col, cores, u, v, k, m, sum_mode, perm, num_rows, path=None):
    """:func:`topk` and the IVE address map of its addresses (SPEC §3.6, as
    :func:`ive_address`) in the same launch: ``(scores, addr, rows, blocks)``, ``rows, blocks
    [R, m]`` int64 with ``rows = perm[addr] % num_rows``, ``blocks = perm[addr] // num_rows``.
    ``perm``: int32 ``[N^2]``. One launch on the fused path, three (the map in the final
    kernel) otherwise; ``path`` as in :func:`topk`."""
    return _topk(s_row, s_col, cores, u, v, k, m, sum_mode, None, path, perm, num_rows)


def _topk(s_row, s_col, cores, u, v, k, m, sum_mode, phase1, path, perm, num_rows):
    rows, n = s_row.shape[0], s_row.shape[1]
    rank = 1 if sum_mode else s_row.shape[2]
    h_c = 1 if sum_mode else cores.shape[0]
    dev = s_row.device
    m_pad = triton.next_power_of_2(m)
    kk = k * k
    if path not in (None, "fused", "launches"):
        raise ValueError(f"path {path!r}: expected None, 'fused' or 'launches'")
    fused = _fused_applies(rows, n, k, m)
    if path == "fused" and not fused:
        raise ValueError(f"the fused kernel does not take rows={rows}, N={n}, k={k}, m={m} "
                         f"(FUSED_MAX_ROWS={FUSED_MAX_ROWS}, FUSED_MAX_BLOCK={FUSED_MAX_BLOCK}, "
                         f"FUSED_MAX_GRID={FUSED_MAX_GRID})")
    fused = fused and path != "launches"
    ive = perm is not None
    sel = torch.empty(rows, 2, k, device=dev, dtype=torch.int32)
    tmp = torch.empty(rows, m_pad, device=dev, dtype=torch.int64)
    shape = (rows, m) if sum_mode else (rows, m, h_c)
    out_s = torch.empty(shape, device=dev, dtype=s_row.dtype)
    out_a = torch.empty(rows, m, device=dev, dtype=torch.int64)
    out_r = torch.empty(rows, m, device=dev, dtype=torch.int64) if ive else out_a
    out_b = torch.empty(rows, m, device=dev, dtype=torch.int64) if ive else out_a
    result = (out_s, out_a, out_r, out_b) if ive else (out_s, out_a, None, None)
    if rows == 0:
        return result
    if sum_mode:
        one = torch.ones(1, device=dev, dtype=torch.float32)
        u = v = cores = one
    if not ive:
        perm = sel  # unused (IVE=False)
    if fused:
        ba, bb = _pieces(n, k, FUSED_SPLIT_BLOCK)
        kp = triton.next_power_of_2(k)
        _fused_kernel[(rows,)](s_row, s_col, cores, u, v, sel, tmp, out_s, out_a, perm, out_r,
                               out_b, n, k, m, num_rows, RANK=rank, HC=h_c, SUM_MODE=sum_mode,
                               BLOCK_A=ba, BLOCK_B=bb, KCH=kp, KP=kp, M_PAD=m_pad,
                               BOUND=SELECT_BOUND, IVE=ive,
                               num_warps=_fused_warps(ba + bb, kp * kp))
        return result
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
    ckey = torch.empty(rows, splits, m_pad, device=dev, dtype=torch.uint32)
    cf = torch.empty(rows, splits, m_pad, device=dev, dtype=torch.int32)
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
        _launch_phase1(s_row, s_col, u, v, sel, k, rank)
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
    _final_kernel[(rows,)](s_row, s_col, cores, sel, ckey, cf, tmp, out_s, out_a, perm, out_r,
                           out_b, n, k, m, ncand, num_rows, RANK=rank, HC=h_c,
                           SUM_MODE=sum_mode, BLOCK=fblock, M_PAD=m_pad, BOUND=SELECT_BOUND,
                           IVE=ive, num_warps=8 if fblock >= 4096 else 4)
    return result
