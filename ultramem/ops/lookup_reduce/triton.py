"""Triton kernels for lookup-reduce (SPEC §7, fused lookup-reduce).

Shapes (see :mod:`ultramem.ops.lookup_reduce.reference` for the semantics):
``values [P, D_v]``, ``idx [T, n]``, ``scores [T, n, h_c]``, ``block [T, n]``,
``pre_values [P, D_p]``, ``pre_query [T, D_p]`` -> ``out [T, E, D_v]``.

Kernels
- :func:`_fwd_kernel` -- grid ``(T, D_v / BLOCK_D)``: gathers ``BLOCK_N`` selected rows at a
  time, weights column d by ``scores[t, j, d // (D_v/h_c)]`` (MCS) times the fused V2
  pre-value activation ``act(<pre_query[t], pre_values[idx]>)``, and accumulates into
  ``[E, BLOCK_D]``, one masked column sum per virtual block (IVE). fp32 accumulation.
- :func:`_bwd_scores_kernel` -- grid ``(T,)``: per selection and core the dot product of the
  value slice with the output gradient of its block; gives ``d scores`` and the gradient of
  the pre-value dot product (``ddot``), and stores ``a`` for the value-gradient kernels.
- :func:`_dv_atomic_kernel` -- grid ``(T, D_v / BLOCK_D)``: ``dV[idx] += w * dO`` by fp32
  atomics.
- :func:`_dv_sorted_kernel` -- grid ``(T*n / BLOCK_S, D_v / BLOCK_D)`` over the selections
  sorted by row: each row's occurrences are summed in registers and the row written once in the
  table dtype (deterministic); rows selected more than ``SORT_PIECE`` times are summed in
  pieces into an fp32 staging row (atomics), written by :func:`_dv_stage_kernel`.
- ``"dense"`` value gradient: :func:`_dv_prep_kernel` (segment bounds per row, per-position
  ``grad_out`` row and weights, after an int32 sort), :func:`_dv_dense_kernel` -- grid
  ``(P / BLOCK_R, D_v / BLOCK_D)``: every table row written once in row order, zeros included
  (no separate zero-fill) -- and, for rows selected more than ``DENSE_PIECE`` times,
  :func:`_dv_hot_kernel` (fp32 sums of fixed chunks of sorted positions) and
  :func:`_dv_combine_kernel` (first piece + chunk sums, written in the table dtype).
The pre-value gradients reuse the same kernels: ``d pre_query`` is a lookup-reduce of the
pre-value table weighted by ``ddot``; ``d pre_values`` is the value-gradient scatter of
``pre_query`` weighted by ``ddot``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

ACT_CODES = {"identity": 0, "gelu": 1, "silu": 2}


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 1:  # exact (erf) GELU, as torch.nn.functional.gelu
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        return x / (1.0 + tl.exp(-x))
    else:
        return x


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        return cdf + x * pdf
    elif ACT == 2:
        sig = 1.0 / (1.0 + tl.exp(-x))
        return sig * (1.0 + x * (1.0 - sig))
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def _pre_dot(u_ptr, q_ptr, rows, mask_n, t, D_P, stride_u, stride_q,
             BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """``<pre_query[t], pre_values[rows]>`` for a chunk of selections, fp32."""
    dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    for p0 in range(0, D_P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < D_P
        u = tl.load(u_ptr + rows[:, None] * stride_u + offs_p[None, :],
                    mask=mask_n[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
        q = tl.load(q_ptr + t * stride_q + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        dot += tl.sum(u * q[None, :], axis=1)
    return dot


# ---- forward ---------------------------------------------------------------------------------
# Design (measured on H200 by benchmarks/lr_fwd_sweep.py, 2026-11-22, docs/kernels.md): a
# program owns one token and one column tile; step j gathers BLOCK_N selected rows x BLOCK_D
# columns. The gathered tile is 3-D ``[1, BLOCK_N, BLOCK_D]`` and the IVE planes a broadcast
# along axis 0, so the accumulator keeps the gather's register layout (the previous kernel
# converted every step's contribution through shared memory for E > 1). Compile-time switches,
# chosen per shape class by :func:`_fwd_blocks`:
#
# - ``ACC`` 1: each step's rows are summed at once into ``acc [E_PAD, BLOCK_D]`` (all
#   many-token winners; free when BLOCK_D = 256 * warps, a tile's rows then live in one
#   thread). 0: elementwise ``acc [E_PAD, BLOCK_N, BLOCK_D]`` reduced once at the end (the
#   decode tiles, whose BLOCK_N rows span warps: no cross-warp reduction per step).
# - ``PREFETCH`` (pf) 1: software double buffering, the gather of step j+1 is issued before
#   step j is accumulated (v2-gelu n2 d512 w2: 0.675 of copy). 2: as 1 and the indices of
#   step j+2 are loaded a step earlier still (ive4 n1 d256 w1 ev: 0.670; v2-gelu n4 d512 w2:
#   0.683).
# - ``IDX_REGS`` (ir) 1 / 2: all of the token's selections are loaded once, packed
#   ``[N_PAD, K]`` int32 (word 0 = row * E_PAD + block, words 1..h_c = the fp32 bits of the
#   scores), and a step extracts its entries by a masked sum (1) or ``tl.gather`` (2), so no
#   step waits on an index load (train151m n1 d256 w1 ir1 ns3: 0.801; pkm256 n4 d256 w1 ir2
#   pf1: 0.637). Needs n <= 128 and P * E_PAD < 2^31 (else forward falls back to ir 0).
# - ``NS`` (ns): ``tl.range(num_stages=NS)`` on the selection loop, Triton's own pipeliner
#   (train151m with ir1: ns3).
# - ``EVICT`` (ev): ``evict_first`` on the value / pre-value gathers: table rows are not
#   reused, keep L2 for the index and score vectors (ive4: 0.670 vs 0.638 without).
# - ``CORE_UNIFORM`` (automatic): BLOCK_D divides D_v / h_c, so a tile lies in one MCS core and
#   the score is one per row.
# Not kept (never won in the sweep): several tokens per program (tok), a register cap (maxnreg).


@triton.jit
def _fwd_meta(idx_ptr, s_ptr, blk_ptr, pk, t, n0, N_SEL,
              HC: tl.constexpr, K: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
              BLOCK_N: tl.constexpr, N_PAD: tl.constexpr, IDX_REGS: tl.constexpr):
    """Selections ``n0 .. n0 + BLOCK_N`` of token t: ``rows [BLOCK_N]`` int64, scores
    ``s3 [BLOCK_N, K]`` fp32 (core c at k = c + 1, other slots 0), ``blk [BLOCK_N]`` int32 and
    the validity mask; from memory (IDX_REGS 0) or from the packed register copy ``pk``."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_SEL
    offs_k = tl.arange(0, K)
    if IDX_REGS == 0:
        sel = t * N_SEL + offs_n
        rows = tl.load(idx_ptr + sel, mask=mask_n, other=0).to(tl.int64)
        ms = mask_n[:, None] & ((offs_k >= 1) & (offs_k <= HC))[None, :]
        s3 = tl.load(s_ptr + sel[:, None] * HC + (offs_k - 1)[None, :], mask=ms,
                     other=0.0).to(tl.float32)
        if E > 1:
            blk = tl.load(blk_ptr + sel, mask=mask_n, other=0).to(tl.int32)
        else:
            blk = tl.zeros([BLOCK_N], dtype=tl.int32)
    else:
        if IDX_REGS == 2:  # tl.gather along the selection axis (clamped; masked by mask_n)
            gi = tl.minimum(offs_n, N_PAD - 1)
            x = tl.gather(pk, tl.broadcast_to(gi[:, None], [BLOCK_N, K]), axis=0)
        else:  # masked sum: exact, one nonzero term (int32, so the score bits survive)
            offs_a = tl.arange(0, N_PAD)
            hit = offs_a[None, :, None] == offs_n[:, None, None]
            x = tl.sum(tl.where(hit, pk[None, :, :], 0), axis=1)
        w0 = tl.sum(tl.where((offs_k == 0)[None, :], x, 0), axis=1)
        rows = (w0 // E_PAD).to(tl.int64)
        blk = w0 % E_PAD
        s3 = tl.where((offs_k >= 1)[None, :], x, 0).to(tl.float32, bitcast=True)
    return rows, s3, blk, mask_n


@triton.jit
def _fwd_gather(v_ptr, u_ptr, q_ptr, rows, mask_n, offs_d, mask_d, t, D_P, stride_v, stride_u,
                stride_q, HAS_PRE: tl.constexpr, PRE_TILED: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_P: tl.constexpr, EVICT: tl.constexpr):
    """The value tile ``[1, BLOCK_N, BLOCK_D]`` (table dtype) and the pre-value part: the
    pre-value tile ``[BLOCK_N, BLOCK_P]`` (one tile, D_p <= BLOCK_P), or with ``PRE_TILED``
    (D_p > BLOCK_P) the fp32 dot with ``pre_query[t]`` by a loop over D_p chunks, or a dummy
    without pre-values. Masks have the pointers' full shape."""
    ptrs = v_ptr + rows[None, :, None] * stride_v + offs_d[None, None, :]
    m = mask_n[None, :, None] & mask_d[None, None, :]
    if EVICT:
        vals = tl.load(ptrs, mask=m, other=0.0, eviction_policy="evict_first")
    else:
        vals = tl.load(ptrs, mask=m, other=0.0)
    if HAS_PRE:
        if PRE_TILED:
            u = _pre_dot(u_ptr, q_ptr, rows, mask_n, t, D_P, stride_u, stride_q,
                         BLOCK_N, BLOCK_P)
        else:
            offs_p = tl.arange(0, BLOCK_P)
            uptrs = u_ptr + rows[:, None] * stride_u + offs_p[None, :]
            mu = mask_n[:, None] & (offs_p < D_P)[None, :]
            if EVICT:
                u = tl.load(uptrs, mask=mu, other=0.0, eviction_policy="evict_first")
            else:
                u = tl.load(uptrs, mask=mu, other=0.0)
    else:
        u = tl.zeros([1, 1], dtype=tl.float32)
    return vals, u


@triton.jit
def _fwd_accumulate(acc, vals, s3, blk, u, q, core, c_tile, ACT: tl.constexpr,
                    HC: tl.constexpr, K: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
                    HAS_PRE: tl.constexpr, PRE_TILED: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, ACC: tl.constexpr, CORE_UNIFORM: tl.constexpr):
    """``acc += [block == e] * w * vals``, w = the MCS score of the column's core times the
    pre-value activation. The row-only factors (score, activation, IVE plane) are folded into
    a weight ``[E_PAD, BLOCK_N, 1]`` first: per element one FMA per plane (plus h_c selects
    when the column tile spans several cores)."""
    offs_k = tl.arange(0, K)
    if HC == 1:  # the one score is the only nonzero slot
        s_row = tl.sum(s3, axis=1)
    elif CORE_UNIFORM:  # the column tile lies in one core: one score per row
        s_row = tl.sum(tl.where((offs_k == c_tile + 1)[None, :], s3, 0.0), axis=1)
    else:  # per-column scores, applied below
        s_row = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    if HAS_PRE:  # V2 pre-value activation, fused
        if PRE_TILED:
            dot = u
        else:
            dot = tl.sum(u.to(tl.float32) * q[None, :], axis=1)
        s_row = s_row * _act(dot, ACT)
    w = s_row[None, :, None]  # [1, BLOCK_N, 1]
    if E > 1:  # IVE: the selection's virtual block picks its accumulator plane
        offs_e = tl.arange(0, E_PAD)
        w = tl.where(blk[None, :, None] == offs_e[:, None, None], w, 0.0)  # [E_PAD, BLOCK_N, 1]
    x = vals.to(tl.float32)  # [1, BLOCK_N, BLOCK_D]
    if HC > 1 and not CORE_UNIFORM:  # MCS: column d takes the score of its core
        wc = tl.zeros([1, BLOCK_N, BLOCK_D], dtype=tl.float32)
        for c in tl.static_range(HC):
            s_c = tl.sum(tl.where((offs_k == c + 1)[None, :], s3, 0.0), axis=1)
            wc = tl.where((core == c)[None, None, :], s_c[None, :, None], wc)
        x = x * wc
    contrib = x * w  # [E_PAD, BLOCK_N, BLOCK_D]
    if ACC == 1:
        acc += tl.sum(contrib, axis=1)
    else:
        acc += contrib
    return acc


@triton.jit
def _fwd_kernel(
    v_ptr, idx_ptr, s_ptr, blk_ptr, u_ptr, q_ptr, out_ptr,
    N_SEL, D_V, D_P, stride_v, stride_u, stride_q,
    HC: tl.constexpr, K: tl.constexpr, DC: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
    HAS_PRE: tl.constexpr, PRE_TILED: tl.constexpr, ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, N_PAD: tl.constexpr,
    IDX_REGS: tl.constexpr, PREFETCH: tl.constexpr, NS: tl.constexpr, ACC: tl.constexpr,
    EVICT: tl.constexpr, CORE_UNIFORM: tl.constexpr,
):
    """Grid ``(T, cdiv(D_v, BLOCK_D))``; the switches are described above."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D_V
    core = offs_d // DC
    c_tile = (tl.program_id(1) * BLOCK_D) // DC  # the tile's core when CORE_UNIFORM
    if HAS_PRE and not PRE_TILED:  # pre_query[t], held for the whole program
        offs_p = tl.arange(0, BLOCK_P)
        q = tl.load(q_ptr + t * stride_q + offs_p, mask=offs_p < D_P, other=0.0).to(tl.float32)
    else:
        q = tl.zeros([1], dtype=tl.float32)
    if IDX_REGS > 0:  # all selections of the token, packed, in registers
        offs_a = tl.arange(0, N_PAD)
        offs_k = tl.arange(0, K)
        ma = offs_a < N_SEL
        sel_a = t * N_SEL + offs_a
        w0 = tl.load(idx_ptr + sel_a, mask=ma, other=0).to(tl.int32) * E_PAD
        if E > 1:
            w0 += tl.load(blk_ptr + sel_a, mask=ma, other=0).to(tl.int32)
        ms = ma[:, None] & ((offs_k >= 1) & (offs_k <= HC))[None, :]
        sb = tl.load(s_ptr + sel_a[:, None] * HC + (offs_k - 1)[None, :], mask=ms,
                     other=0.0).to(tl.float32).to(tl.int32, bitcast=True)
        pk = tl.where((offs_k == 0)[None, :], w0[:, None], sb)
    else:
        pk = tl.zeros([1, 1], dtype=tl.int32)
    if ACC == 1:
        acc = tl.zeros([E_PAD, BLOCK_D], dtype=tl.float32)
    else:
        acc = tl.zeros([E_PAD, BLOCK_N, BLOCK_D], dtype=tl.float32)

    if PREFETCH == 0:  # load -> gather -> accumulate, in order
        for n0 in tl.range(0, N_SEL, BLOCK_N, num_stages=NS):
            rows, s3, blk, mask_n = _fwd_meta(idx_ptr, s_ptr, blk_ptr, pk, t, n0, N_SEL,
                                              HC, K, E, E_PAD, BLOCK_N, N_PAD, IDX_REGS)
            vals, u = _fwd_gather(v_ptr, u_ptr, q_ptr, rows, mask_n, offs_d, mask_d, t, D_P,
                                  stride_v, stride_u, stride_q, HAS_PRE, PRE_TILED, BLOCK_N,
                                  BLOCK_P, EVICT)
            acc = _fwd_accumulate(acc, vals, s3, blk, u, q, core, c_tile, ACT, HC, K, E, E_PAD,
                                  HAS_PRE, PRE_TILED, BLOCK_N, BLOCK_D, ACC, CORE_UNIFORM)
    elif PREFETCH == 1:  # double buffering: gather j+1 is in flight while j accumulates
        rows, s3, blk, mask_n = _fwd_meta(idx_ptr, s_ptr, blk_ptr, pk, t, 0, N_SEL,
                                          HC, K, E, E_PAD, BLOCK_N, N_PAD, IDX_REGS)
        vals, u = _fwd_gather(v_ptr, u_ptr, q_ptr, rows, mask_n, offs_d, mask_d, t, D_P,
                              stride_v, stride_u, stride_q, HAS_PRE, PRE_TILED, BLOCK_N,
                              BLOCK_P, EVICT)
        for n0 in tl.range(0, N_SEL, BLOCK_N, num_stages=NS):
            rows_1, s3_1, blk_1, mask_1 = _fwd_meta(idx_ptr, s_ptr, blk_ptr, pk, t,
                                                    n0 + BLOCK_N, N_SEL, HC, K, E, E_PAD,
                                                    BLOCK_N, N_PAD, IDX_REGS)
            vals_1, u_1 = _fwd_gather(v_ptr, u_ptr, q_ptr, rows_1, mask_1, offs_d, mask_d, t,
                                      D_P, stride_v, stride_u, stride_q, HAS_PRE, PRE_TILED,
                                      BLOCK_N, BLOCK_P, EVICT)
            acc = _fwd_accumulate(acc, vals, s3, blk, u, q, core, c_tile, ACT, HC, K, E, E_PAD,
                                  HAS_PRE, PRE_TILED, BLOCK_N, BLOCK_D, ACC, CORE_UNIFORM)
            vals, u, s3, blk = vals_1, u_1, s3_1, blk_1
    else:  # PREFETCH 2: indices two steps ahead, gather one step ahead
        rows, s3, blk, mask_n = _fwd_meta(idx_ptr, s_ptr, blk_ptr, pk, t, 0, N_SEL,
                                          HC, K, E, E_PAD, BLOCK_N, N_PAD, IDX_REGS)
        vals, u = _fwd_gather(v_ptr, u_ptr, q_ptr, rows, mask_n, offs_d, mask_d, t, D_P,
                              stride_v, stride_u, stride_q, HAS_PRE, PRE_TILED, BLOCK_N,
                              BLOCK_P, EVICT)
        rows_1, s3_1, blk_1, mask_1 = _fwd_meta(idx_ptr, s_ptr, blk_ptr, pk, t, BLOCK_N, N_SEL,
                                                HC, K, E, E_PAD, BLOCK_N, N_PAD, IDX_REGS)
        for n0 in tl.range(0, N_SEL, BLOCK_N, num_stages=NS):
            rows_2, s3_2, blk_2, mask_2 = _fwd_meta(idx_ptr, s_ptr, blk_ptr, pk, t,
                                                    n0 + 2 * BLOCK_N, N_SEL, HC, K, E, E_PAD,
                                                    BLOCK_N, N_PAD, IDX_REGS)
            vals_1, u_1 = _fwd_gather(v_ptr, u_ptr, q_ptr, rows_1, mask_1, offs_d, mask_d, t,
                                      D_P, stride_v, stride_u, stride_q, HAS_PRE, PRE_TILED,
                                      BLOCK_N, BLOCK_P, EVICT)
            acc = _fwd_accumulate(acc, vals, s3, blk, u, q, core, c_tile, ACT, HC, K, E, E_PAD,
                                  HAS_PRE, PRE_TILED, BLOCK_N, BLOCK_D, ACC, CORE_UNIFORM)
            vals, u, s3, blk = vals_1, u_1, s3_1, blk_1
            rows_1, s3_1, blk_1, mask_1 = rows_2, s3_2, blk_2, mask_2

    if ACC == 1:
        res = acc
    else:
        res = tl.sum(acc, axis=1)
    offs_e = tl.arange(0, E_PAD)
    ptrs = out_ptr + (t * E + offs_e[:, None]) * D_V + offs_d[None, :]
    tl.store(ptrs, res.to(out_ptr.dtype.element_ty),
             mask=(offs_e < E)[:, None] & mask_d[None, :])


@triton.jit
def _bwd_scores_kernel(
    v_ptr, idx_ptr, s_ptr, blk_ptr, u_ptr, q_ptr, go_ptr,
    ds_ptr, a_ptr, ddot_ptr,
    N_SEL, D_V, D_P, stride_v, stride_u, stride_q,
    HC: tl.constexpr, DC: tl.constexpr, E: tl.constexpr,
    HAS_PRE: tl.constexpr, ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_SEL
    sel = t * N_SEL + offs_n
    rows = tl.load(idx_ptr + sel, mask=mask_n, other=0).to(tl.int64)
    if E > 1:
        blk = tl.load(blk_ptr + sel, mask=mask_n, other=0).to(tl.int64)
    else:
        blk = tl.zeros([BLOCK_N], dtype=tl.int64)
    go_row = (t * E + blk) * D_V
    if HAS_PRE:
        dot = _pre_dot(u_ptr, q_ptr, rows, mask_n, t, D_P, stride_u, stride_q,
                       BLOCK_N, BLOCK_P)
        a = _act(dot, ACT)
    else:
        a = tl.full([BLOCK_N], 1.0, tl.float32)
    da = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c in tl.static_range(HC):
        dw2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, DC, BLOCK_D):
            offs_d = c * DC + d0 + tl.arange(0, BLOCK_D)
            m2 = mask_n[:, None] & ((d0 + tl.arange(0, BLOCK_D)) < DC)[None, :]
            vals = tl.load(v_ptr + rows[:, None] * stride_v + offs_d[None, :], mask=m2,
                           other=0.0).to(tl.float32)
            go = tl.load(go_ptr + go_row[:, None] + offs_d[None, :], mask=m2,
                         other=0.0).to(tl.float32)
            dw2 += vals * go
        dw = tl.sum(dw2, axis=1)
        s_c = tl.load(s_ptr + sel * HC + c, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(ds_ptr + sel * HC + c, dw * a, mask=mask_n)
        da += dw * s_c
    if HAS_PRE:
        tl.store(a_ptr + sel, a, mask=mask_n)
        tl.store(ddot_ptr + sel, da * _act_grad(dot, ACT), mask=mask_n)


@triton.jit
def _weighted_grad_rows(w_ptr, blk_ptr, go_ptr, sel, t, mask, offs_d, mask_d, core, D_V,
                        HC: tl.constexpr, E: tl.constexpr):
    """``w[sel, core(d)] * dO[t, block[sel], d]`` for a vector of flat selections ``sel`` of
    tokens ``t`` (fp32 ``[len(sel), BLOCK_D]``; masked-out selections give 0): one value-gradient
    term each, shared by the atomic and the segment-reduce kernels."""
    if E > 1:
        blk = tl.load(blk_ptr + sel, mask=mask, other=0).to(tl.int64)
    else:
        blk = tl.zeros(sel.shape, dtype=tl.int64)
    w = tl.zeros([sel.shape[0], offs_d.shape[0]], dtype=tl.float32)
    for c in tl.static_range(HC):
        w_c = tl.load(w_ptr + sel * HC + c, mask=mask, other=0.0)
        w = tl.where((core == c)[None, :], w_c[:, None], w)
    m2 = mask[:, None] & mask_d[None, :]
    go = tl.load(go_ptr + ((t * E + blk) * D_V)[:, None] + offs_d[None, :], mask=m2,
                 other=0.0).to(tl.float32)
    return w * go


@triton.jit
def _dv_atomic_kernel(
    idx_ptr, w_ptr, blk_ptr, go_ptr, dv_ptr, N_SEL, D_V,
    HC: tl.constexpr, DC: tl.constexpr, E: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dV[idx[t, j], d] += w[t, j, core(d)] * dO[t, block[t, j], d]`` (fp32 atomics)."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D_V
    core = offs_d // DC
    for n0 in range(0, N_SEL, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_SEL
        sel = t * N_SEL + offs_n
        rows = tl.load(idx_ptr + sel, mask=mask_n, other=0).to(tl.int64)
        wgo = _weighted_grad_rows(w_ptr, blk_ptr, go_ptr, sel, t, mask_n, offs_d, mask_d, core,
                                  D_V, HC, E)
        tl.atomic_add(dv_ptr + rows[:, None] * D_V + offs_d[None, :], wgo,
                      mask=mask_n[:, None] & mask_d[None, :])


@triton.jit
def _dv_sorted_kernel(
    srt_ptr, order_ptr, start_ptr, end_ptr, w_ptr, blk_ptr, go_ptr, dv_ptr,
    stage_ptr, N_TOT, N_SEL, D_V,
    HC: tl.constexpr, DC: tl.constexpr, E: tl.constexpr, PIECE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Segment reduce over selections sorted by row, in pieces of at most ``PIECE`` occurrences.

    A program takes ``BLOCK_S`` sorted positions; each position that starts a piece sums it
    (occurrence j of all pieces of the tile together, so the serial loop is at most ``PIECE``
    long even for hot rows). A row selected at most ``PIECE`` times is written once, directly in
    the table dtype; the pieces of a longer (hot) segment add into an fp32 staging row (atomics)
    that :func:`_dv_stage_kernel` casts and writes. Hot segments are longer than ``PIECE``, so
    their starts differ by more than ``PIECE``: ``start // (PIECE + 1)`` is a unique slot."""
    pos = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    valid = pos < N_TOT
    st = tl.load(start_ptr + pos, mask=valid, other=0)
    en = tl.load(end_ptr + pos, mask=valid, other=0)
    head = valid & ((pos - st) % PIECE == 0)
    plen = tl.where(head, tl.minimum(en - pos, PIECE), 0)
    max_len = tl.max(plen, axis=0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D_V
    core = offs_d // DC
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for j in range(0, max_len):
        mj = j < plen
        sel = tl.load(order_ptr + pos + j, mask=mj, other=0).to(tl.int64)
        acc += _weighted_grad_rows(w_ptr, blk_ptr, go_ptr, sel, sel // N_SEL, mj, offs_d,
                                   mask_d, core, D_V, HC, E)
    row = tl.load(srt_ptr + pos, mask=valid, other=0).to(tl.int64)
    hot = (en - st) > PIECE
    short = head & ~hot
    tl.store(dv_ptr + row[:, None] * D_V + offs_d[None, :], acc.to(dv_ptr.dtype.element_ty),
             mask=short[:, None] & mask_d[None, :])
    lid = st.to(tl.int64) // (PIECE + 1)
    tl.atomic_add(stage_ptr + lid[:, None] * D_V + offs_d[None, :], acc,
                  mask=(head & hot)[:, None] & mask_d[None, :])


@triton.jit
def _dv_stage_kernel(stage_ptr, srt_ptr, start_ptr, end_ptr, dv_ptr, N_TOT, D_V,
                     PIECE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """``dV[row] = stage[i]`` for the hot row whose segment starts in sorted positions
    ``[i (PIECE+1), (i+1) (PIECE+1))``, if any (staged by :func:`_dv_sorted_kernel`)."""
    i = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_P)
    pos = i * (PIECE + 1) + offs
    m = (offs < PIECE + 1) & (pos < N_TOT)
    st = tl.load(start_ptr + pos, mask=m, other=-1)
    en = tl.load(end_ptr + pos, mask=m, other=0)
    srt = tl.load(srt_ptr + pos, mask=m, other=-1)
    row = tl.max(tl.where(m & (st == pos) & (en - st > PIECE), srt, -1), axis=0).to(tl.int64)
    if row >= 0:
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D_V
        acc = tl.load(stage_ptr + i * D_V + offs_d, mask=mask_d, other=0.0)
        tl.store(dv_ptr + row * D_V + offs_d, acc.to(dv_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _dv_prep_kernel(srt_ptr, order_ptr, w_ptr, blk_ptr, start_ptr, end_ptr, gsrc_ptr, wsrt_ptr,
                    N_TOT, N_SEL, HC: tl.constexpr, E: tl.constexpr, BLOCK: tl.constexpr):
    """Per sorted position p (selection ``sel = order[p]``): ``gsrc[p] = t E + block[sel]`` (the
    ``grad_out`` row, int32) and ``wsrt[p, :] = w[sel, :]`` (fp32), so that the value-gradient
    kernels read their per-occurrence data near-contiguously and one dependent load earlier;
    and ``start[r], end[r]``: the sorted positions of row r's segment, written by the segment's
    head and tail (rows never selected keep the caller's zeros, an empty segment)."""
    pos = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = pos < N_TOT
    key = tl.load(srt_ptr + pos, mask=m, other=0)
    prev = tl.load(srt_ptr + pos - 1, mask=m & (pos > 0), other=-1)
    nxt = tl.load(srt_ptr + pos + 1, mask=(pos + 1) < N_TOT, other=-1)
    rows = key.to(tl.int64)
    tl.store(start_ptr + rows, pos, mask=m & (key != prev))
    tl.store(end_ptr + rows, pos + 1, mask=m & (key != nxt))
    sel = tl.load(order_ptr + pos, mask=m, other=0).to(tl.int64)
    t = sel // N_SEL
    if E > 1:
        blk = tl.load(blk_ptr + sel, mask=m, other=0).to(tl.int64)
    else:
        blk = tl.zeros([BLOCK], dtype=tl.int64)
    tl.store(gsrc_ptr + pos, (t * E + blk).to(tl.int32), mask=m)
    pos64 = pos.to(tl.int64)
    for c in tl.static_range(HC):
        tl.store(wsrt_ptr + pos64 * HC + c, tl.load(w_ptr + sel * HC + c, mask=m, other=0.0),
                 mask=m)


@triton.jit
def _dv_rows_contrib(gsrc_ptr, wsrt_ptr, go_ptr, pos, mp, offs_d, mask_d, core, core0, D_V,
                     HC: tl.constexpr, ONE_CORE: tl.constexpr):
    """``wsrt[p, core(d)] * dO[gsrc[p], d]`` (fp32 ``[len(pos), BLOCK_D]``, 0 where ``~mp``) for
    sorted positions ``pos``. ``ONE_CORE``: the column tile lies in MCS core ``core0``, so the
    weight is one value per position (no per-column select)."""
    g = tl.load(gsrc_ptr + pos, mask=mp, other=0).to(tl.int64)
    pos64 = pos.to(tl.int64)
    m2 = mp[:, None] & mask_d[None, :]
    go = tl.load(go_ptr + (g * D_V)[:, None] + offs_d[None, :], mask=m2, other=0.0)
    if ONE_CORE:
        w1 = tl.load(wsrt_ptr + pos64 * HC + core0, mask=mp, other=0.0)
        return w1[:, None] * go.to(tl.float32)
    else:
        w_0 = tl.load(wsrt_ptr + pos64 * HC, mask=mp, other=0.0)
        w = tl.where((core == 0)[None, :], w_0[:, None], 0.0)
        for c in tl.static_range(1, HC):
            w_c = tl.load(wsrt_ptr + pos64 * HC + c, mask=mp, other=0.0)
            w = tl.where((core == c)[None, :], w_c[:, None], w)
        return w * go.to(tl.float32)


@triton.jit
def _dv_chunk_heads(srt_ptr, start_ptr, end_ptr, N_CHUNK, PIECE: tl.constexpr,
                    CPB: tl.constexpr):
    """The chunks ``c = pid + i G`` (i < CPB, G programs along axis 0) of a persistent hot-row
    kernel, with the segment bounds of the row at each chunk's first sorted position."""
    cs = tl.program_id(0) + tl.arange(0, CPB) * tl.num_programs(0)
    mc = cs < N_CHUNK
    rows = tl.load(srt_ptr + cs.to(tl.int64) * PIECE, mask=mc, other=0).to(tl.int64)
    st = tl.load(start_ptr + rows, mask=mc, other=0)
    en = tl.load(end_ptr + rows, mask=mc, other=0)
    return cs, mc, st, en


@triton.jit
def _dv_cols(D_V, DC: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's column tile of the value gradient: ``(offs_d, mask_d, core of each
    column, core of the tile's first column)`` (MCS cores are ``DC`` columns wide)."""
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return offs_d, offs_d < D_V, offs_d // DC, (tl.program_id(1) * BLOCK_D) // DC


@triton.jit
def _dv_chunk_at(sel, cs, st, en):
    """Chunk id and its segment's ``[start, end)`` at the one lane ``sel`` of the chunk walk."""
    return (tl.sum(tl.where(sel, cs, 0), axis=0), tl.sum(tl.where(sel, st, 0), axis=0),
            tl.sum(tl.where(sel, en, 0), axis=0))


@triton.jit
def _dv_hot_kernel(
    srt_ptr, start_ptr, end_ptr, gsrc_ptr, wsrt_ptr, go_ptr, carry_ptr, N_CHUNK, D_V,
    HC: tl.constexpr, DC: tl.constexpr, PIECE: tl.constexpr, ONE_CORE: tl.constexpr,
    CPB: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Hot rows (selected more than ``PIECE`` times) beyond their first ``PIECE`` occurrences.

    Chunk c is the sorted positions ``[c PIECE, (c+1) PIECE)`` (fixed, not aligned to
    segments). A position p of a hot segment ``[st, en)`` with ``p >= st + PIECE`` has
    ``st < c PIECE``, so the segment contains the chunk's first position: one segment at most
    per chunk. If that segment is hot and started before the chunk, the chunk's positions
    ``[max(c PIECE, st + PIECE), min((c+1) PIECE, en))`` are summed in fixed order into the fp32
    row ``carry[c]`` (a plain store; one writer per slot). Persistent grid ``(G, D_v /
    BLOCK_D)``: program i takes chunks ``i, i + G, ...`` (the chunks of one hot row go to
    different programs), checks them all with vector loads and works only on hot ones."""
    cs, mc, st, en = _dv_chunk_heads(srt_ptr, start_ptr, end_ptr, N_CHUNK, PIECE, CPB)
    need = mc & (en - st > PIECE) & (cs * PIECE > st)
    if tl.sum(need.to(tl.int32), axis=0) > 0:
        offs_i = tl.arange(0, CPB)
        offs_d, mask_d, core, core0 = _dv_cols(D_V, DC, BLOCK_D)
        for i in range(0, CPB):
            if tl.sum((need & (offs_i == i)).to(tl.int32), axis=0) > 0:
                c, st_i, en_i = _dv_chunk_at(offs_i == i, cs, st, en)
                hi = tl.minimum(c * PIECE + PIECE, en_i)
                acc = tl.zeros([SUB, BLOCK_D], dtype=tl.float32)
                for s0 in range(tl.maximum(c * PIECE, st_i + PIECE), hi, SUB):
                    pos = s0 + tl.arange(0, SUB)
                    acc += _dv_rows_contrib(gsrc_ptr, wsrt_ptr, go_ptr, pos, pos < hi, offs_d,
                                            mask_d, core, core0, D_V, HC, ONE_CORE)
                tl.store(carry_ptr + c.to(tl.int64) * D_V + offs_d, tl.sum(acc, axis=0),
                         mask=mask_d)


@triton.jit
def _dv_combine_kernel(
    srt_ptr, start_ptr, end_ptr, gsrc_ptr, wsrt_ptr, go_ptr, carry_ptr, dv_ptr, N_CHUNK, D_V,
    HC: tl.constexpr, DC: tl.constexpr, PIECE: tl.constexpr, ONE_CORE: tl.constexpr,
    CPB: tl.constexpr, SUB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Hot rows, final: row r (segment ``[st, en)``, ``en - st > PIECE``) is owned by chunk
    ``st // PIECE + 1`` (its first carry chunk; unique). The owner sums the first ``PIECE``
    occurrences, adds ``carry[st // PIECE + 1 ..= (en - 1) // PIECE]`` in chunk order
    (``BLOCK_C`` a step), and writes the row in the table dtype. Same persistent grid and chunk
    walk as :func:`_dv_hot_kernel`."""
    cs, mc, st, en = _dv_chunk_heads(srt_ptr, start_ptr, end_ptr, N_CHUNK, PIECE, CPB)
    own = mc & (en - st > PIECE) & (cs == st // PIECE + 1)
    if tl.sum(own.to(tl.int32), axis=0) > 0:
        offs_i = tl.arange(0, CPB)
        offs_d, mask_d, core, core0 = _dv_cols(D_V, DC, BLOCK_D)
        for i in range(0, CPB):
            if tl.sum((own & (offs_i == i)).to(tl.int32), axis=0) > 0:
                c, st_i, en_i = _dv_chunk_at(offs_i == i, cs, st, en)
                acc = tl.zeros([SUB, BLOCK_D], dtype=tl.float32)
                for s0 in range(st_i, st_i + PIECE, SUB):
                    pos = s0 + tl.arange(0, SUB)
                    acc += _dv_rows_contrib(gsrc_ptr, wsrt_ptr, go_ptr, pos,
                                            pos < st_i + PIECE, offs_d, mask_d, core, core0,
                                            D_V, HC, ONE_CORE)
                c_hi = (en_i - 1) // PIECE + 1
                tot = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
                for k0 in range(c, c_hi, BLOCK_C):
                    ks = k0 + tl.arange(0, BLOCK_C)
                    mk = (ks < c_hi)[:, None] & mask_d[None, :]
                    tot += tl.load(carry_ptr + ks.to(tl.int64)[:, None] * D_V + offs_d[None, :],
                                   mask=mk, other=0.0)
                res = tl.sum(acc, axis=0) + tl.sum(tot, axis=0)
                row = tl.load(srt_ptr + st_i).to(tl.int64)
                tl.store(dv_ptr + row * D_V + offs_d, res.to(dv_ptr.dtype.element_ty),
                         mask=mask_d)


@triton.jit
def _dv_dense_kernel(
    start_ptr, end_ptr, gsrc_ptr, wsrt_ptr, go_ptr, dv_ptr, P, D_V,
    HC: tl.constexpr, DC: tl.constexpr, PIECE: tl.constexpr, ONE_CORE: tl.constexpr,
    UNROLL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The dense value gradient in row order: program (i, k) owns table rows
    ``[i BLOCK_R, (i+1) BLOCK_R)`` x column tile k and writes all of them in the table dtype
    (zeros for rows never selected) -- the gradient's only write, no separate zero-fill.

    Row r's occurrences are the sorted positions ``[start[r], end[r])`` (the rows of a tile
    occupy one contiguous range of them). Step j adds occurrence j of every row of the tile
    (fp32 registers, occurrences in sorted = (t, j) order, ``UNROLL`` occurrences issued per
    loop step); the loop runs ``max count`` steps over the tile's rows with at most ``PIECE``
    occurrences. Hot rows (more) are skipped here and written by :func:`_dv_combine_kernel`."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < P
    st = tl.load(start_ptr + rows, mask=mask_r, other=0)
    en = tl.load(end_ptr + rows, mask=mask_r, other=0)
    cnt = en - st
    hot = cnt > PIECE
    cnt = tl.where(hot, 0, cnt)
    n_max = tl.max(cnt, axis=0)
    offs_d, mask_d, core, core0 = _dv_cols(D_V, DC, BLOCK_D)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for j in range(0, n_max, UNROLL):
        for u in tl.static_range(UNROLL):
            acc += _dv_rows_contrib(gsrc_ptr, wsrt_ptr, go_ptr, st + (j + u), (j + u) < cnt,
                                    offs_d, mask_d, core, core0, D_V, HC, ONE_CORE)
    ptrs = dv_ptr + rows.to(tl.int64)[:, None] * D_V + offs_d[None, :]
    tl.store(ptrs, acc.to(dv_ptr.dtype.element_ty), mask=(mask_r & ~hot)[:, None] & mask_d[None, :])

def _pow2(x: int, lo: int = 1, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(int(x), 1)))
    return min(p, hi) if hi is not None else p


SORT_BLOCK_S = 16  # sorted positions per program of the segment-reduce kernel
SORT_PIECE = 64  # occurrences summed serially per piece; hotter rows are staged in fp32
# "BLOCK_N,BLOCK_D,num_warps[,PREFETCH[,IDX_REGS[,NS[,EVICT[,ACC]]]]]" override of _fwd_blocks
# (tuning; missing fields: pf 0, ir 0, ns 1, ev 0, acc 1). ir > 0 falls back to 0 when n > 128.
FWD_BLOCKS = os.environ.get("ULTRAMEM_LR_FWD_BLOCKS")
FWD_PRE_TILE = 256  # wider pre-values are dotted by a loop over chunks (PRE_TILED)


class FwdCfg(NamedTuple):
    """Tile and switches of :func:`_fwd_kernel` (see the comment above it)."""

    bn: int  # BLOCK_N: selections per step
    bd: int  # BLOCK_D: columns per program
    w: int  # num_warps
    pf: int = 0  # PREFETCH
    ir: int = 0  # IDX_REGS
    ns: int = 1  # tl.range num_stages
    ev: int = 0  # EVICT
    acc: int = 1  # ACC


def _fwd_blocks(t: int, d_v: int, n: int, e: int, d_p: int = 0) -> FwdCfg:
    """Tile and switches per shape (measured on H200, docs/kernels.md, "Lookup-reduce").

    Few tokens (decode): narrow column tiles and all selections of a token at once, in order,
    elementwise accumulator (latency bound; the tiles measured at T = 1 and 64). Many tokens:
    the sweep's winners per shape class (``d_p``: pre-value width, 0 without)."""
    if FWD_BLOCKS:
        f = [int(x) for x in FWD_BLOCKS.split(",")]
        f += [0, 0, 1, 0, 1][len(f) - 3:] if len(f) < 8 else []
        return FwdCfg(_pow2(n, 1, f[0]), _pow2(d_v, 16, f[1]), *f[2:8])
    work = t * triton.cdiv(d_v, 128)
    if work < 64:  # a few tokens: all selections in one step, narrow column tiles
        return FwdCfg(_pow2(n, 1, 128), _pow2(d_v, 16, 64 if e == 1 else 32), 8, acc=0)
    if work < 1024:
        return FwdCfg(_pow2(n, 1, 16), _pow2(d_v, 16, 128), 4, acc=0)
    small_n = n <= 128  # IDX_REGS possible
    if e > 1:
        if d_v >= 1024:  # ive4 (D_v 1024, E 4): 0.670 of copy
            return FwdCfg(1, 256, 1, pf=2, ev=1)
        if small_n:  # train151m (D_v 512, E 4): 0.801
            return FwdCfg(1, _pow2(d_v, 16, 256), 1, ir=1, ns=3)
        return FwdCfg(1, _pow2(d_v, 16, 256), 1, pf=2)  # train151m without ir: 0.730
    if d_p:  # v2-gelu (D_v 384, D_p 128): n4 0.683; wide pre-values (more registers): n2
        if d_p <= 128:
            return FwdCfg(_pow2(n, 1, 4), _pow2(d_v, 16, 512), 2, pf=2)
        return FwdCfg(_pow2(n, 1, 2), _pow2(d_v, 16, 512), 2, pf=1)
    if small_n:  # pkm256 (D_v 256): 0.637
        return FwdCfg(_pow2(n, 1, 4), _pow2(d_v, 16, 256), 1, pf=1, ir=2)
    return FwdCfg(_pow2(n, 1, 4), _pow2(d_v, 16, 256), 1, pf=1)


def _fwd_launch(values, idx, scores, block, e, pre_values, pre_query, activation, out):
    """``(grid, args, kwargs)`` of :func:`_fwd_kernel` (also used by the compile check of
    benchmarks/lr_fwd_sweep.py, on meta tensors)."""
    t, n = idx.shape
    h_c = scores.shape[-1]
    p, d_v = values.shape
    has_pre = pre_values is not None
    d_p = pre_values.shape[1] if has_pre else 1
    cfg = _fwd_blocks(t, d_v, n, e, d_p if has_pre else 0)
    e_pad = _pow2(e)
    ir = cfg.ir if _pow2(n) <= 128 and p * e_pad < 2**31 else 0
    # one pre-value tile per step unless it is wide or the step has many rows (decode: 128
    # rows x 64-column chunks, as the previous kernel)
    pre_tiled = has_pre and (d_p > FWD_PRE_TILE or cfg.bn * _pow2(d_p) > 4096)
    if not has_pre:
        block_p = 16
    elif pre_tiled:
        block_p = _pow2(d_p, 16, 64 if cfg.bn > 16 else 128)
    else:
        block_p = _pow2(d_p, 16)
    grid = (t, triton.cdiv(d_v, cfg.bd))
    args = (values, idx, scores, block if e > 1 else idx, pre_values if has_pre else values,
            pre_query if has_pre else values, out, n, d_v, d_p, values.stride(0),
            pre_values.stride(0) if has_pre else 0, pre_query.stride(0) if has_pre else 0)
    kwargs = dict(HC=h_c, K=_pow2(h_c + 1), DC=d_v // h_c, E=e, E_PAD=e_pad, HAS_PRE=has_pre,
                  PRE_TILED=pre_tiled, ACT=ACT_CODES[activation], BLOCK_N=cfg.bn,
                  BLOCK_D=cfg.bd, BLOCK_P=block_p, N_PAD=_pow2(n), IDX_REGS=ir,
                  PREFETCH=cfg.pf, NS=cfg.ns, ACC=cfg.acc, EVICT=cfg.ev,
                  CORE_UNIFORM=h_c > 1 and d_v % h_c == 0 and (d_v // h_c) % cfg.bd == 0,
                  num_warps=cfg.w)
    return grid, args, kwargs


def forward(values, idx, scores, block, num_blocks, pre_values, pre_query, activation,
            out_dtype=None):
    """``out [T, E, D_v]``; ``scores [T, n, h_c]`` (any float dtype), ``idx [T, n]``."""
    t = idx.shape[0]
    e = num_blocks if block is not None else 1
    out = torch.empty(t, e, values.shape[1], device=values.device,
                      dtype=out_dtype or values.dtype)
    if t == 0:
        return out
    grid, args, kwargs = _fwd_launch(values, idx, scores, block, e, pre_values, pre_query,
                                     activation, out)
    _fwd_kernel[grid](*args, **kwargs)
    return out


def backward_scores(values, idx, scores, block, num_blocks, pre_values, pre_query, activation,
                    grad_out):
    """``(d scores [T, n, h_c] fp32, a [T, n] fp32 | None, ddot [T, n] fp32 | None)``."""
    t, n = idx.shape
    h_c = scores.shape[-1]
    d_v = values.shape[1]
    e = num_blocks if block is not None else 1
    has_pre = pre_values is not None
    ds = torch.empty(t, n, h_c, device=values.device, dtype=torch.float32)
    a = torch.empty(t, n, device=values.device, dtype=torch.float32) if has_pre else None
    ddot = torch.empty_like(a) if has_pre else None
    d_p = pre_values.shape[1] if has_pre else 1
    block_n = _pow2(n, 1, 16)
    _bwd_scores_kernel[(t, triton.cdiv(n, block_n))](
        values, idx, scores, block if e > 1 else idx, pre_values if has_pre else values,
        pre_query if has_pre else values, grad_out, ds, a if has_pre else ds,
        ddot if has_pre else ds,
        n, d_v, d_p, values.stride(0), pre_values.stride(0) if has_pre else 0,
        pre_query.stride(0) if has_pre else 0,
        HC=h_c, DC=d_v // h_c, E=e, HAS_PRE=has_pre, ACT=ACT_CODES[activation],
        BLOCK_N=block_n, BLOCK_D=_pow2(d_v // h_c, 16, 128),
        BLOCK_P=_pow2(d_p, 16, 128), num_warps=4,
    )
    return ds, a, ddot


DV_METHODS = ("dense", "sort", "atomic")
DENSE_PIECE = 32  # occurrences a row sums serially in the dense kernel; hotter rows go by chunks
DENSE_PREP_BLOCK = 1024  # sorted positions per program of the preprocessing kernel
DENSE_HOT_GRID = 1024  # programs of the persistent hot-row kernels (x column tiles)
DENSE_CARRY_BLOCK = 16  # carry chunks a hot row adds per step
# "BLOCK_R,BLOCK_D,num_warps[,UNROLL]" of the dense kernel (tuning; default by _dense_blocks)
DENSE_BLOCKS = os.environ.get("ULTRAMEM_LR_DENSE_BLOCKS")


def _dense_blocks(d_v: int) -> tuple[int, int, int, int]:
    """``(BLOCK_R, BLOCK_D, num_warps, UNROLL)`` of :func:`_dv_dense_kernel`."""
    if DENSE_BLOCKS:
        cfg = [int(x) for x in DENSE_BLOCKS.split(",")]
        return cfg[0], _pow2(d_v, 16, cfg[1]), cfg[2], cfg[3] if len(cfg) > 3 else 2
    return 16, _pow2(d_v, 16, 256), 4, 2


def _check_int32(n_tot: int, num_rows: int, go_rows: int) -> None:
    """The dense method keeps sorted positions, row ids and grad_out rows in int32."""
    if max(n_tot, num_rows, go_rows) >= 2**31:
        raise ValueError(f"scatter_rows: T*n = {n_tot}, P = {num_rows} and T*E = {go_rows} "
                         "must be < 2^31 for the dense method")


def sort_prep(idx):
    """``"sort"`` preprocessing: ``(srt, order, start, end)`` int64 -- the flat row ids sorted
    (stable), the selection at each sorted position, and each position's segment bounds."""
    srt, order = torch.sort(idx.reshape(-1), stable=True)
    start = torch.searchsorted(srt, srt, right=False)  # segment bounds of every sorted position
    end = torch.searchsorted(srt, srt, right=True)
    return srt, order, start, end


def dense_prep(num_rows, idx, w, block, num_blocks):
    """``"dense"`` preprocessing, no host synchronisation: ``(srt, bounds, gsrc, wsrt)``.

    ``srt`` int32: the flat row ids sorted by a stable ``torch.sort`` on int32 keys (fewer
    radix passes than int64; stable, so each row's occurrences stay in (t, j) order and the sums
    are deterministic). ``bounds [2, P]`` int32: each row's segment ``[start, end)`` of sorted
    positions (``0, 0`` for rows never selected: a zero-fill of 8 bytes a row, not a count +
    cumsum). Per sorted position, from :func:`_dv_prep_kernel`: ``gsrc`` int32 the
    ``grad_out`` row ``t E + block``, ``wsrt [T n, h_c]`` fp32 the weights. Needs ``T n``,
    ``P`` and ``T E`` < 2^31."""
    t, n = idx.shape
    e = num_blocks if block is not None else 1
    n_tot = t * n
    _check_int32(n_tot, num_rows, t * e)
    h_c = w.shape[-1]
    dev = idx.device
    srt, order = torch.sort(idx.reshape(-1).to(torch.int32), stable=True)
    bounds = torch.zeros(2, num_rows, device=dev, dtype=torch.int32)
    gsrc = torch.empty(n_tot, device=dev, dtype=torch.int32)
    wsrt = torch.empty(n_tot, h_c, device=dev, dtype=torch.float32)
    if n_tot > 0:
        _dv_prep_kernel[(triton.cdiv(n_tot, DENSE_PREP_BLOCK),)](
            srt, order, w, block if e > 1 else idx, bounds[0], bounds[1], gsrc, wsrt, n_tot, n,
            HC=h_c, E=e, BLOCK=DENSE_PREP_BLOCK, num_warps=4)
    return srt, bounds, gsrc, wsrt


def _scatter_dense(num_rows, idx, w, block, num_blocks, grad_out, dtype):
    """The ``"dense"`` method of :func:`scatter_rows` (four launches after the sort)."""
    t, n = idx.shape
    h_c = w.shape[-1]
    d_v = grad_out.shape[-1]
    dev = grad_out.device
    n_tot = t * n
    if n_tot == 0 or num_rows == 0 or d_v == 0:
        return torch.zeros(num_rows, d_v, device=dev, dtype=dtype)
    srt, bounds, gsrc, wsrt = dense_prep(num_rows, idx, w, block, num_blocks)
    dc = d_v // h_c
    piece = DENSE_PIECE
    n_chunk = triton.cdiv(n_tot, piece)
    # hot rows: one fp32 row per chunk of PIECE sorted positions; only chunks inside hot
    # segments are written (and read), so no fill. n_tot / PIECE x D_v x 4 bytes.
    carry = torch.empty(n_chunk, d_v, device=dev, dtype=torch.float32)
    block_h = _pow2(d_v, 16, 256)
    grid_dh = triton.cdiv(d_v, block_h)
    g = max(1, min(n_chunk, DENSE_HOT_GRID // grid_dh))
    hot_kw = dict(HC=h_c, DC=dc, PIECE=piece, ONE_CORE=h_c == 1 or dc % block_h == 0,
                  CPB=_pow2(triton.cdiv(n_chunk, g)), SUB=_pow2(piece, 1, 16), BLOCK_D=block_h,
                  num_warps=4)
    _dv_hot_kernel[(g, grid_dh)](srt, bounds[0], bounds[1], gsrc, wsrt, grad_out, carry,
                                 n_chunk, d_v, **hot_kw)
    dv = torch.empty(num_rows, d_v, device=dev, dtype=dtype)
    block_r, block_d, warps, unroll = _dense_blocks(d_v)
    _dv_dense_kernel[(triton.cdiv(num_rows, block_r), triton.cdiv(d_v, block_d))](
        bounds[0], bounds[1], gsrc, wsrt, grad_out, dv, num_rows, d_v,
        HC=h_c, DC=dc, PIECE=piece, ONE_CORE=h_c == 1 or dc % block_d == 0, UNROLL=unroll,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    _dv_combine_kernel[(g, grid_dh)](srt, bounds[0], bounds[1], gsrc, wsrt, grad_out, carry,
                                     dv, n_chunk, d_v, BLOCK_C=DENSE_CARRY_BLOCK, **hot_kw)
    return dv


def scatter_rows(num_rows, idx, w, block, num_blocks, grad_out, dtype, method="sort"):
    """``dV [num_rows, D_v]`` with ``dV[idx[t,j], c-slice] += w[t,j,c] * grad_out[t, block, c-slice]``.

    ``w [T, n, h_c]`` fp32, ``grad_out [T, E, D_v]`` contiguous. ``method``:

    - ``"dense"``: the whole gradient in row order by :func:`_dv_dense_kernel` (every row written
      once, zeros included, in ``dtype``: no separate zero-fill); rows selected more than
      :data:`DENSE_PIECE` times are summed by chunks (:func:`_dv_hot_kernel`) and written by
      :func:`_dv_combine_kernel`. Bitwise deterministic (no atomics). Preprocessing
      :func:`dense_prep` (int32 sort + one kernel).
    - ``"sort"``: zero-fill, then a segment reduce after sorting by row that writes the selected
      rows in ``dtype``; rows selected more than :data:`SORT_PIECE` times go through a small fp32
      staging table (atomics: those rows are not bitwise deterministic).
    - ``"atomic"``: fp32 atomics into an fp32 copy of the whole table, then a cast.

    No host synchronisation in any of them.
    """
    if method not in DV_METHODS:
        raise ValueError(f"scatter_rows: unknown method {method!r} (one of {DV_METHODS})")
    t, n = idx.shape
    h_c = w.shape[-1]
    d_v = grad_out.shape[-1]
    e = num_blocks if block is not None else 1
    blk = block if e > 1 else idx
    block_d = _pow2(d_v, 16, 256)
    dev = grad_out.device
    n_tot = t * n
    if method == "atomic":
        acc_dtype = torch.float32
        dv = torch.zeros(num_rows, d_v, device=dev, dtype=acc_dtype)
        if t > 0:
            _dv_atomic_kernel[(t, triton.cdiv(d_v, block_d))](
                idx, w, blk, grad_out, dv, n, d_v, HC=h_c, DC=d_v // h_c, E=e,
                BLOCK_N=_pow2(n, 1, 16), BLOCK_D=block_d, num_warps=4,
            )
        return dv.to(dtype)
    if method == "dense":
        return _scatter_dense(num_rows, idx, w, block, num_blocks, grad_out, dtype)
    dv = torch.zeros(num_rows, d_v, device=dev, dtype=dtype)
    if n_tot == 0:
        return dv
    srt, order, start, end = sort_prep(idx)
    n_stage = triton.cdiv(n_tot, SORT_PIECE + 1)  # one fp32 slot per possible hot segment
    stage = torch.zeros(n_stage, d_v, device=dev, dtype=torch.float32)
    grid_d = triton.cdiv(d_v, block_d)
    _dv_sorted_kernel[(triton.cdiv(n_tot, SORT_BLOCK_S), grid_d)](
        srt, order, start, end, w, blk, grad_out, dv, stage, n_tot, n, d_v,
        HC=h_c, DC=d_v // h_c, E=e, PIECE=SORT_PIECE, BLOCK_S=SORT_BLOCK_S, BLOCK_D=block_d,
        num_warps=4,
    )
    _dv_stage_kernel[(n_stage, grid_d)](stage, srt, start, end, dv, n_tot, d_v, PIECE=SORT_PIECE,
                                        BLOCK_P=_pow2(SORT_PIECE + 1), BLOCK_D=block_d,
                                        num_warps=4)
    return dv
