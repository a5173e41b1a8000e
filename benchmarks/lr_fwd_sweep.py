"""Sweep of candidate lookup-reduce forward kernels against the current one (H200 bandwidth study).

The current kernel (``ultramem.ops.lookup_reduce.triton._fwd_kernel``) reaches 49-63 % of copy
bandwidth on large random gathers. Hypothesis: too few bytes in flight per SM, because each loop
step loads the indices (L2 latency), then gathers the rows they name (DRAM latency), then
accumulates, all serially; the gather of step j+1 is not issued before step j is accumulated.
This file holds one new kernel, :func:`_sweep_kernel`, with compile-time switches that attack
that chain, and times combinations of them (plus tiles) on the four shapes of the study.

Semantics (as :mod:`ultramem.ops.lookup_reduce.reference`)::

    out[t, g, d] = sum_j [block[t,j] == g] * scores[t, j, d // (D_v/h_c)]
                   * act(<pre_query[t], pre_values[idx[t,j]]>) * V[idx[t,j], d]

Switches (all compile-time, all combinable; a variant is written ``n1 d256 w1 ir1 pf1 ...``):

- ``BLOCK_N`` (``n``), ``BLOCK_D`` (``d``), ``num_warps`` (``w``): the tile. Grid
  ``(cdiv(T, TOK), cdiv(D_v, BLOCK_D))``; a step gathers ``TOK x BLOCK_N`` rows x ``BLOCK_D``.
- ``IDX_REGS`` (``ir``): 0 -- every step loads its indices / scores / blocks from memory.
  1, 2 -- the program loads ALL of its tokens' selections once, at its start, into registers,
  packed as ``[TOK, N_PAD, K]`` int32 (word 0 = ``row * E_PAD + block``, words 1..h_c = the
  fp32 bits of the core scores), so no step waits for an index load. A step extracts its
  ``BLOCK_N`` entries with a masked sum over ``N_PAD`` (1) or ``tl.gather`` (2). Needs
  ``n <= 128`` and ``P * E_PAD < 2^31``.
- ``PREFETCH`` (``pf``): manual software pipelining. 0 -- load, gather, accumulate in order.
  1 -- double buffering: the prologue gathers step 0; the body gathers step j+1 (mask all-false
  past the end), then accumulates step j, then rotates, so one gather is always in flight while
  the program computes. 2 -- as 1, and the indices of step j+2 are loaded one step earlier still
  (only useful with ``ir0``: the gather of step j+1 then never waits on its index load).
- ``NS`` (``ns``): ``tl.range(..., num_stages=NS)`` on the selection loop: Triton's own
  pipeliner (1 = off, as a plain ``range``: the kernel-level ``num_stages`` only pipelines loads
  that feed dots).
- ``ACC`` (``acc``): accumulator. 0 -- as the current kernel, elementwise
  ``acc[TOK, E_PAD, BLOCK_N, BLOCK_D]``, reduced over ``BLOCK_N`` once at the end. 1 -- the
  step's rows are summed at once into ``acc[TOK, E_PAD, BLOCK_D]``: fewer registers, and free
  when ``BLOCK_D == 256 * num_warps`` (the rows of a tile then live in one thread).
  Either way the gathered tile is 4-D ``[TOK, 1, BLOCK_N, BLOCK_D]`` and the IVE planes a
  broadcast along axis 1, so the accumulator inherits the gather's register layout (8
  contiguous bf16 per thread). (The current kernel, for E > 1, builds its accumulator in a
  1-element-per-thread layout and converts every step's contribution through shared memory;
  seen in its TTGIR for sm_90.) The row-only factors (score, pre-value activation, IVE plane
  mask) are folded into a ``[TOK, E_PAD, BLOCK_N, 1]`` weight first: per element, one FMA per
  plane.
- ``TOK`` (``tok``): tokens per program, INTERLEAVED: every step gathers the next ``BLOCK_N``
  selections of each of the program's TOK consecutive tokens, as one ``[TOK, BLOCK_N, BLOCK_D]``
  tile (rows of token k accumulate into token k's planes). Interleaving (rather than looping
  over the tokens one after the other) keeps all TOK tokens in one software pipeline: no
  prologue per token, and TOK times the bytes per step with the same step count; the cost is
  TOK times the accumulator registers. All tensors carry the leading TOK axis (size 1 for TOK 1).
- ``EVICT`` (``ev``): ``eviction_policy="evict_first"`` on the value (and pre-value) gathers:
  rows of a 0.5-2 GB table are not reused, so keep L2 for the index / score vectors.
- ``maxnreg`` (``r64``): cap registers per thread, so that more programs stay resident (at
  most 65536 / (regs * 32 * warps) per SM), at the risk of spills.
- ``CORE_UNIFORM`` (automatic, not a switch): when ``BLOCK_D`` divides ``D_v / h_c`` every
  column tile lies in one core, so the MCS score is one per row and the per-element work is one
  FMA per IVE plane; otherwise each element selects its core's score (h_c selects).

Pre-values (V2, ``D_p``, act identity / gelu / silu): the whole ``pre_values`` row is one tile
(``BLOCK_P = next_pow2(D_p)``, so ``D_p <= 256``); it is gathered together with the value row
(so it follows IDX_REGS / PREFETCH / NS / TOK like the values) and dotted with ``pre_query[t]``
(held in registers for the whole program) at accumulate time.

Production rows (2026-11-22 on): the design above (acc1 layout and the pf / ir / ns / ev switches
that won) is now ``ultramem.ops.lookup_reduce.triton._fwd_kernel``. Every shape first times the
production kernel through ``lookup_reduce(..., impl="triton")`` at its default tiles
(``prod default (...)``), then at the ``PROD_ALTS`` tiles (``ULTRAMEM_LR_FWD_BLOCKS`` strings),
then the previous production kernel (``_old_fwd_kernel`` at its old default tiles). The decode
shapes (``DECODE_SHAPES``: the 1.6B model, T 1 and 64) have no sweep variants and are timed by
CUDA-graph replay (as ``benchmarks/ops.py``), so a decode regression shows as
``prod default`` slower than ``old kernel``.

Modes::

    # CPU: every smoke variant vs the fp64 reference (interpreter, tiny shapes, fp32 tables)
    PYTHONPATH=. .venv/bin/python benchmarks/lr_fwd_sweep.py --smoke
    # CPU: compile every GPU variant for sm_90 (no GPU needed), report failures / registers
    PYTHONPATH=. .venv/bin/python benchmarks/lr_fwd_sweep.py --compile-check
    # CPU: compile the production kernel for sm_90 at every config _fwd_blocks returns on
    # ALL_SHAPES (+ PROD_ALTS, + the old kernel): registers, spills, barriers / shared memory
    # inside loops (from the PTX)
    PYTHONPATH=. .venv/bin/python benchmarks/lr_fwd_sweep.py --compile-check-prod
    # GPU: check every variant against impl="triton", time it, write <out>/lr_fwd_sweep.json
    PYTHONPATH=. python3 benchmarks/lr_fwd_sweep.py --out $OUT [--shapes ive4,pkm256] [--variants 'ir1.*pf1']

On the GPU all variants are first compiled in parallel worker processes (``--jobs``) into the
Triton disk cache, so the timed process only loads them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass

if __name__ == "__main__" and "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import _bench  # noqa: E402  (benchmarks/_bench.py)
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ultramem.ops.lookup_reduce.triton import ACT_CODES, _act, _pre_dot  # noqa: E402
from ultramem.ops.lookup_reduce.triton import _pow2 as _p2  # noqa: E402

# ---- kernel ----------------------------------------------------------------------------------


@triton.jit
def _meta(idx_ptr, s_ptr, blk_ptr, pk, tok, mask_t, n0, N_SEL,
          HC: tl.constexpr, K: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
          TOK: tl.constexpr, BLOCK_N: tl.constexpr, N_PAD: tl.constexpr,
          IDX_REGS: tl.constexpr):
    """Selections ``n0 .. n0 + BLOCK_N`` of each token: ``rows [TOK, BLOCK_N]`` int64, scores
    ``s3 [TOK, BLOCK_N, K]`` fp32 (core c at k = c + 1, other slots 0), ``blk [TOK, BLOCK_N]``
    int32 and the validity mask. From memory (IDX_REGS 0) or from the packed register copy."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = mask_t[:, None] & (offs_n < N_SEL)[None, :]
    offs_k = tl.arange(0, K)
    if IDX_REGS == 0:
        sel = tok[:, None] * N_SEL + offs_n[None, :]
        rows = tl.load(idx_ptr + sel, mask=mask_n, other=0)
        ms = mask_n[:, :, None] & ((offs_k >= 1) & (offs_k <= HC))[None, None, :]
        s3 = tl.load(s_ptr + sel[:, :, None] * HC + (offs_k - 1)[None, None, :], mask=ms,
                     other=0.0).to(tl.float32)
        if E > 1:
            blk = tl.load(blk_ptr + sel, mask=mask_n, other=0).to(tl.int32)
        else:
            blk = tl.zeros([TOK, BLOCK_N], dtype=tl.int32)
    else:
        if IDX_REGS == 2:  # tl.gather along the selection axis (clamped; masked by mask_n)
            gi = tl.minimum(offs_n, N_PAD - 1)
            x = tl.gather(pk, tl.broadcast_to(gi[None, :, None], [TOK, BLOCK_N, K]), axis=1)
        else:  # masked sum: exact, one nonzero term (int32, so the score bits survive)
            offs_a = tl.arange(0, N_PAD)
            hit = offs_a[None, None, :, None] == offs_n[None, :, None, None]
            x = tl.sum(tl.where(hit, pk[:, None, :, :], 0), axis=2)
        w0 = tl.sum(tl.where((offs_k == 0)[None, None, :], x, 0), axis=2)
        rows = (w0 // E_PAD).to(tl.int64)
        blk = w0 % E_PAD
        s3 = tl.where((offs_k >= 1)[None, None, :], x, 0).to(tl.float32, bitcast=True)
    return rows, s3, blk, mask_n


@triton.jit
def _gather(v_ptr, u_ptr, rows, mask_n, offs_d, mask_d, D_P, stride_v, stride_u,
            HAS_PRE: tl.constexpr, BLOCK_P: tl.constexpr, EVICT: tl.constexpr):
    """The value tile ``[TOK, BLOCK_N, BLOCK_D]`` and pre-value tile ``[TOK, BLOCK_N, BLOCK_P]``
    (table dtype; a dummy when there are no pre-values). Masks have the pointers' full shape."""
    ptrs = v_ptr + rows[:, None, :, None] * stride_v + offs_d[None, None, None, :]
    m = mask_n[:, None, :, None] & mask_d[None, None, None, :]
    if EVICT:
        vals = tl.load(ptrs, mask=m, other=0.0, eviction_policy="evict_first")
    else:
        vals = tl.load(ptrs, mask=m, other=0.0)
    if HAS_PRE:
        offs_p = tl.arange(0, BLOCK_P)
        uptrs = u_ptr + rows[:, :, None] * stride_u + offs_p[None, None, :]
        mu = mask_n[:, :, None] & (offs_p < D_P)[None, None, :]
        if EVICT:
            u = tl.load(uptrs, mask=mu, other=0.0, eviction_policy="evict_first")
        else:
            u = tl.load(uptrs, mask=mu, other=0.0)
    else:
        u = tl.zeros([1, 1, 1], dtype=tl.float32)
    return vals, u


@triton.jit
def _accumulate(acc, vals, s3, blk, u, q, core, c_tile, ACT: tl.constexpr,
                HC: tl.constexpr, K: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
                HAS_PRE: tl.constexpr, TOK: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, ACC: tl.constexpr, CORE_UNIFORM: tl.constexpr):
    """``acc += [block == e] * w * vals``, w = the MCS score of the column's core times the
    pre-value activation. Everything that depends on the row only (score, activation, IVE
    plane) is folded into a per-row, per-plane weight ``[TOK, E_PAD, BLOCK_N, 1]`` first, so
    the per-element work is one FMA per plane (plus HC selects when a column tile spans
    several cores)."""
    offs_k = tl.arange(0, K)
    if HC == 1:  # the one score is the only nonzero slot
        s_row = tl.sum(s3, axis=2)
    elif CORE_UNIFORM:  # the column tile lies in one core: one score per row
        s_row = tl.sum(tl.where((offs_k == c_tile + 1)[None, None, :], s3, 0.0), axis=2)
    else:  # per-column scores, applied below
        s_row = tl.full([TOK, BLOCK_N], 1.0, dtype=tl.float32)
    if HAS_PRE:  # V2 pre-value activation, fused
        dot = tl.sum(u.to(tl.float32) * q[:, None, :], axis=2)
        s_row = s_row * _act(dot, ACT)
    w = s_row[:, None, :, None]  # [TOK, 1, BLOCK_N, 1]
    if E > 1:  # IVE: the selection's virtual block picks its accumulator plane
        offs_e = tl.arange(0, E_PAD)
        hit = blk[:, None, :, None] == offs_e[None, :, None, None]
        w = tl.where(hit, w, 0.0)  # [TOK, E_PAD, BLOCK_N, 1]
    x = vals.to(tl.float32)  # [TOK, 1, BLOCK_N, BLOCK_D]
    if HC > 1 and not CORE_UNIFORM:  # MCS: column d takes the score of its core
        wc = tl.zeros([TOK, 1, BLOCK_N, BLOCK_D], dtype=tl.float32)
        for c in tl.static_range(HC):
            s_c = tl.sum(tl.where((offs_k == c + 1)[None, None, :], s3, 0.0), axis=2)
            wc = tl.where((core == c)[None, None, None, :], s_c[:, None, :, None], wc)
        x = x * wc
    contrib = x * w  # [TOK, E_PAD, BLOCK_N, BLOCK_D]
    if ACC == 1:
        acc += tl.sum(contrib, axis=2)
    else:
        acc += contrib
    return acc


@triton.jit
def _sweep_kernel(
    v_ptr, idx_ptr, s_ptr, blk_ptr, u_ptr, q_ptr, out_ptr,
    T, N_SEL, D_V, D_P, stride_v, stride_u, stride_q,
    HC: tl.constexpr, K: tl.constexpr, DC: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
    HAS_PRE: tl.constexpr, ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, N_PAD: tl.constexpr,
    TOK: tl.constexpr, IDX_REGS: tl.constexpr, PREFETCH: tl.constexpr, NS: tl.constexpr,
    ACC: tl.constexpr, EVICT: tl.constexpr, CORE_UNIFORM: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * TOK + tl.arange(0, TOK)
    mask_t = tok < T
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D_V
    core = offs_d // DC
    c_tile = (tl.program_id(1) * BLOCK_D) // DC  # the tile's core when CORE_UNIFORM
    if HAS_PRE:  # pre_query rows of the program's tokens, held for the whole program
        offs_p = tl.arange(0, BLOCK_P)
        mq = mask_t[:, None] & (offs_p < D_P)[None, :]
        q = tl.load(q_ptr + tok[:, None] * stride_q + offs_p[None, :], mask=mq,
                    other=0.0).to(tl.float32)
    else:
        q = tl.zeros([TOK, 1], dtype=tl.float32)
    if IDX_REGS > 0:  # all selections of the program's tokens, packed, in registers
        offs_a = tl.arange(0, N_PAD)
        offs_k = tl.arange(0, K)
        ma = mask_t[:, None] & (offs_a < N_SEL)[None, :]
        sel_a = tok[:, None] * N_SEL + offs_a[None, :]
        w0 = tl.load(idx_ptr + sel_a, mask=ma, other=0).to(tl.int32) * E_PAD
        if E > 1:
            w0 += tl.load(blk_ptr + sel_a, mask=ma, other=0).to(tl.int32)
        ms = ma[:, :, None] & ((offs_k >= 1) & (offs_k <= HC))[None, None, :]
        sb = tl.load(s_ptr + sel_a[:, :, None] * HC + (offs_k - 1)[None, None, :], mask=ms,
                     other=0.0).to(tl.float32).to(tl.int32, bitcast=True)
        pk = tl.where((offs_k == 0)[None, None, :], w0[:, :, None], sb)
    else:
        pk = tl.zeros([1, 1, 1], dtype=tl.int32)
    if ACC == 1:
        acc = tl.zeros([TOK, E_PAD, BLOCK_D], dtype=tl.float32)
    else:
        acc = tl.zeros([TOK, E_PAD, BLOCK_N, BLOCK_D], dtype=tl.float32)

    if PREFETCH == 0:  # load -> gather -> accumulate, in order
        for n0 in tl.range(0, N_SEL, BLOCK_N, num_stages=NS):
            rows, s3, blk, mask_n = _meta(idx_ptr, s_ptr, blk_ptr, pk, tok, mask_t, n0, N_SEL,
                                          HC, K, E, E_PAD, TOK, BLOCK_N, N_PAD, IDX_REGS)
            vals, u = _gather(v_ptr, u_ptr, rows, mask_n, offs_d, mask_d, D_P, stride_v,
                              stride_u, HAS_PRE, BLOCK_P, EVICT)
            acc = _accumulate(acc, vals, s3, blk, u, q, core, c_tile, ACT, HC, K, E, E_PAD,
                              HAS_PRE, TOK, BLOCK_N, BLOCK_D, ACC, CORE_UNIFORM)
    elif PREFETCH == 1:  # double buffering: gather j+1 is in flight while j accumulates
        rows, s3, blk, mask_n = _meta(idx_ptr, s_ptr, blk_ptr, pk, tok, mask_t, 0, N_SEL,
                                      HC, K, E, E_PAD, TOK, BLOCK_N, N_PAD, IDX_REGS)
        vals, u = _gather(v_ptr, u_ptr, rows, mask_n, offs_d, mask_d, D_P, stride_v, stride_u,
                          HAS_PRE, BLOCK_P, EVICT)
        for n0 in tl.range(0, N_SEL, BLOCK_N, num_stages=NS):
            rows_1, s3_1, blk_1, mask_1 = _meta(idx_ptr, s_ptr, blk_ptr, pk, tok, mask_t,
                                                n0 + BLOCK_N, N_SEL, HC, K, E, E_PAD, TOK,
                                                BLOCK_N, N_PAD, IDX_REGS)
            vals_1, u_1 = _gather(v_ptr, u_ptr, rows_1, mask_1, offs_d, mask_d, D_P, stride_v,
                                  stride_u, HAS_PRE, BLOCK_P, EVICT)
            acc = _accumulate(acc, vals, s3, blk, u, q, core, c_tile, ACT, HC, K, E, E_PAD,
                              HAS_PRE, TOK, BLOCK_N, BLOCK_D, ACC, CORE_UNIFORM)
            vals, u, s3, blk = vals_1, u_1, s3_1, blk_1
    else:  # PREFETCH 2: indices two steps ahead, gather one step ahead
        rows, s3, blk, mask_n = _meta(idx_ptr, s_ptr, blk_ptr, pk, tok, mask_t, 0, N_SEL,
                                      HC, K, E, E_PAD, TOK, BLOCK_N, N_PAD, IDX_REGS)
        vals, u = _gather(v_ptr, u_ptr, rows, mask_n, offs_d, mask_d, D_P, stride_v, stride_u,
                          HAS_PRE, BLOCK_P, EVICT)
        rows_1, s3_1, blk_1, mask_1 = _meta(idx_ptr, s_ptr, blk_ptr, pk, tok, mask_t, BLOCK_N,
                                            N_SEL, HC, K, E, E_PAD, TOK, BLOCK_N, N_PAD,
                                            IDX_REGS)
        for n0 in tl.range(0, N_SEL, BLOCK_N, num_stages=NS):
            rows_2, s3_2, blk_2, mask_2 = _meta(idx_ptr, s_ptr, blk_ptr, pk, tok, mask_t,
                                                n0 + 2 * BLOCK_N, N_SEL, HC, K, E, E_PAD, TOK,
                                                BLOCK_N, N_PAD, IDX_REGS)
            vals_1, u_1 = _gather(v_ptr, u_ptr, rows_1, mask_1, offs_d, mask_d, D_P, stride_v,
                                  stride_u, HAS_PRE, BLOCK_P, EVICT)
            acc = _accumulate(acc, vals, s3, blk, u, q, core, c_tile, ACT, HC, K, E, E_PAD,
                              HAS_PRE, TOK, BLOCK_N, BLOCK_D, ACC, CORE_UNIFORM)
            vals, u, s3, blk = vals_1, u_1, s3_1, blk_1
            rows_1, s3_1, blk_1, mask_1 = rows_2, s3_2, blk_2, mask_2

    if ACC == 1:
        res = acc
    else:
        res = tl.sum(acc, axis=2)
    offs_e = tl.arange(0, E_PAD)
    ptrs = out_ptr + (tok[:, None, None] * E + offs_e[None, :, None]) * D_V + offs_d[None, None, :]
    mo = mask_t[:, None, None] & (offs_e < E)[None, :, None] & mask_d[None, None, :]
    tl.store(ptrs, res.to(out_ptr.dtype.element_ty), mask=mo)


# ---- the previous production kernel (before 2026-11-22), for comparison rows ------------------
@triton.jit
def _old_fwd_kernel(
    v_ptr, idx_ptr, s_ptr, blk_ptr, u_ptr, q_ptr, out_ptr,
    N_SEL, D_V, D_P, stride_v, stride_u, stride_q,
    HC: tl.constexpr, DC: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
    HAS_PRE: tl.constexpr, ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D_V
    core = offs_d // DC
    offs_e = tl.arange(0, E_PAD)
    # elementwise accumulators across the loop over selections (no reduction inside the loop)
    if E > 1:
        acc = tl.zeros([E_PAD, BLOCK_N, BLOCK_D], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N_SEL, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_SEL
        sel = t * N_SEL + offs_n
        rows = tl.load(idx_ptr + sel, mask=mask_n, other=0).to(tl.int64)
        m2 = mask_n[:, None] & mask_d[None, :]
        vals = tl.load(v_ptr + rows[:, None] * stride_v + offs_d[None, :], mask=m2,
                       other=0.0).to(tl.float32)
        # MCS: column d takes the score of its core slice
        w = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for c in tl.static_range(HC):
            s_c = tl.load(s_ptr + sel * HC + c, mask=mask_n, other=0.0).to(tl.float32)
            w = tl.where((core == c)[None, :], s_c[:, None], w)
        if HAS_PRE:  # V2 pre-value activation, fused
            a = _act(_pre_dot(u_ptr, q_ptr, rows, mask_n, t, D_P, stride_u, stride_q,
                              BLOCK_N, BLOCK_P), ACT)
            w = w * a[:, None]
        contrib = vals * w
        if E > 1:  # IVE: the selection's virtual block picks its accumulator plane
            blk = tl.load(blk_ptr + sel, mask=mask_n, other=E_PAD)
            acc += tl.where(blk[None, :, None] == offs_e[:, None, None], contrib[None, :, :], 0.0)
        else:
            acc += contrib
    if E > 1:
        res = tl.sum(acc, axis=1)
        ptrs = out_ptr + (t * E + offs_e[:, None]) * D_V + offs_d[None, :]
        tl.store(ptrs, res.to(out_ptr.dtype.element_ty),
                 mask=(offs_e[:, None] < E) & mask_d[None, :])
    else:
        res1 = tl.sum(acc, axis=0)
        tl.store(out_ptr + t * D_V + offs_d, res1.to(out_ptr.dtype.element_ty), mask=mask_d)


def _old_forward(values, idx, scores, block, e, pre_values, pre_query, activation):
    """The previous production ``forward`` (kernel and default tiles), bf16 output."""
    t, n = idx.shape
    h_c = scores.shape[-1]
    d_v = values.shape[1]
    e = e if block is not None else 1
    out = torch.empty(t, e, d_v, device=values.device, dtype=values.dtype)
    has_pre = pre_values is not None
    work = t * triton.cdiv(d_v, 128)
    if work < 64:
        bn, bd, w = _p2(n, 1, 128), _p2(d_v, 16, 64 if e == 1 else 32), 8
    elif work < 1024:
        bn, bd, w = _p2(n, 1, 16), _p2(d_v, 16, 128), 4
    else:
        bn, bd, w = _p2(n, 1, 2 if e == 1 else 1), _p2(d_v, 16, 256), 1
    d_p = pre_values.shape[1] if has_pre else 1
    _old_fwd_kernel[(t, triton.cdiv(d_v, bd))](
        values, idx, scores, block if e > 1 else idx, pre_values if has_pre else values,
        pre_query if has_pre else values, out, n, d_v, d_p, values.stride(0),
        pre_values.stride(0) if has_pre else 0, pre_query.stride(0) if has_pre else 0,
        HC=h_c, DC=d_v // h_c, E=e, E_PAD=_p2(e), HAS_PRE=has_pre, ACT=ACT_CODES[activation],
        BLOCK_N=bn, BLOCK_D=bd, BLOCK_P=_p2(d_p, 16, 64 if has_pre and bn > 16 else 128),
        num_warps=w)
    return out


# ---- variants and launch ---------------------------------------------------------------------
@dataclass(frozen=True)
class Cfg:
    bn: int  # BLOCK_N
    bd: int  # BLOCK_D
    w: int  # num_warps
    ir: int = 0  # IDX_REGS: 0 memory, 1 masked-sum extraction, 2 tl.gather
    pf: int = 0  # PREFETCH: 0 none, 1 gather one step ahead, 2 + indices two steps ahead
    ns: int = 1  # tl.range num_stages (1 = no Triton pipelining)
    acc: int = 0  # 0 elementwise [.., BLOCK_N, BLOCK_D] accumulator, 1 per-step row sum
    tok: int = 1  # tokens per program (interleaved)
    ev: int = 0  # evict_first on the gathers
    r: int = 0  # maxnreg (0: the compiler's choice): trade registers for resident programs

    @property
    def name(self) -> str:
        s = f"n{self.bn} d{self.bd} w{self.w}"
        for key, default in (("ir", 0), ("pf", 0), ("ns", 1), ("acc", 0), ("tok", 1)):
            if getattr(self, key) != default:
                s += f" {key}{getattr(self, key)}"
        return s + (" ev" if self.ev else "") + (f" r{self.r}" if self.r else "")


def parse_cfg(spec: str) -> Cfg:
    """``"BN,BD,W flag flag ..."`` with flags ``ir1 pf2 ns3 acc1 tok2 ev r64``."""
    tile, *flags = spec.split()
    bn, bd, w = (int(x) for x in tile.split(","))
    kw = {}
    for f in flags:
        if f == "ev":
            kw["ev"] = 1
        else:
            m = re.fullmatch(r"(ir|pf|ns|acc|tok|r)(\d+)", f)
            if not m:
                raise ValueError(f"bad flag {f!r} in {spec!r}")
            kw[m.group(1)] = int(m.group(2))
    return Cfg(bn, bd, w, **kw)


def _pow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


@dataclass
class Problem:
    name: str
    values: torch.Tensor  # [P, D_v]
    idx: torch.Tensor  # [T, n] int64
    scores: torch.Tensor  # [T, n, h_c]
    block: torch.Tensor | None  # [T, n] int64, None when E == 1
    e: int
    pre_values: torch.Tensor | None
    pre_query: torch.Tensor | None
    act: str = "identity"

    def fwd_bytes(self) -> int:
        t, n = self.idx.shape
        p, d = self.values.shape
        hc = self.scores.shape[-1]
        dp = self.pre_values.shape[1] if self.pre_values is not None else 0
        el = self.values.element_size()
        return (t * n * (d * el + 8 + hc * el + dp * el + (8 if self.e > 1 else 0))
                + t * self.e * d * el + t * dp * el)


def unsupported(cfg: Cfg, pb: Problem) -> str | None:
    """Why this variant cannot run this problem (None: it can)."""
    n = pb.idx.shape[1]
    if cfg.ir and _pow2(n) > 128:
        return "IDX_REGS needs n <= 128"
    if cfg.ir and pb.values.shape[0] * _pow2(pb.e) >= 2 ** 31:
        return "IDX_REGS packs row * E_PAD in int32"
    if pb.pre_values is not None and _pow2(pb.pre_values.shape[1]) > 256:
        return "pre-values need D_p <= 256 (one tile)"
    if pb.values.shape[1] % pb.scores.shape[-1]:
        return "h_c must divide D_v"
    return None


def kernel_call(cfg: Cfg, pb: Problem, out: torch.Tensor):
    """``(grid, args, kwargs)`` of :func:`_sweep_kernel` for this variant and problem."""
    t, n = pb.idx.shape
    hc = pb.scores.shape[-1]
    p, d_v = pb.values.shape
    has_pre = pb.pre_values is not None
    d_p = pb.pre_values.shape[1] if has_pre else 1
    bn, bd = min(cfg.bn, _pow2(n)), min(cfg.bd, max(16, _pow2(d_v)))
    grid = (triton.cdiv(t, cfg.tok), triton.cdiv(d_v, bd))
    args = (pb.values, pb.idx, pb.scores, pb.block if pb.e > 1 else pb.idx,
            pb.pre_values if has_pre else pb.values, pb.pre_query if has_pre else pb.values, out,
            t, n, d_v, d_p, pb.values.stride(0), pb.pre_values.stride(0) if has_pre else 0,
            pb.pre_query.stride(0) if has_pre else 0)
    kwargs = dict(HC=hc, K=_pow2(hc + 1), DC=d_v // hc, E=pb.e, E_PAD=_pow2(pb.e),
                  HAS_PRE=has_pre, ACT=ACT_CODES[pb.act], BLOCK_N=bn, BLOCK_D=bd,
                  BLOCK_P=max(16, _pow2(d_p)) if has_pre else 16, N_PAD=_pow2(n), TOK=cfg.tok,
                  IDX_REGS=cfg.ir, PREFETCH=cfg.pf, NS=cfg.ns, ACC=cfg.acc, EVICT=cfg.ev,
                  CORE_UNIFORM=hc > 1 and (d_v // hc) % bd == 0, num_warps=cfg.w)
    if cfg.r:
        kwargs["maxnreg"] = cfg.r
    return grid, args, kwargs


def new_out(pb: Problem, dtype=None) -> torch.Tensor:
    t = pb.idx.shape[0]
    return torch.empty(t, pb.e, pb.values.shape[1], device=pb.values.device,
                       dtype=dtype or pb.values.dtype)


def launcher(cfg: Cfg, pb: Problem, out: torch.Tensor):
    grid, args, kwargs = kernel_call(cfg, pb, out)
    kern = _sweep_kernel[grid]
    return lambda: kern(*args, **kwargs)


def first_lines(exc: BaseException, k: int = 4) -> str:
    lines = [ln for ln in "".join(traceback.format_exception_only(type(exc), exc)).splitlines()
             if ln.strip()]
    return " | ".join(lines[:k])[:600]


# ---- smoke (CPU interpreter) -----------------------------------------------------------------
# (T, n, D_v, h_c, E, D_p, act, P): odd T (TOK tails), non-power-of-two n and D_v, cores that
# straddle column tiles, n > BLOCK_N * steps and n < BLOCK_N
SMOKE_SHAPES = [
    ("s-n5", 7, 5, 24, 1, 1, 0, "identity", 50),
    ("s-n33-ive-mcs", 5, 33, 96, 2, 4, 0, "identity", 300),
    ("s-n84-ive-mcs", 3, 84, 96, 2, 4, 0, "identity", 500),
    ("s-v2-gelu", 6, 33, 24, 1, 1, 12, "gelu", 200),
    ("s-v2-silu-ive", 5, 5, 24, 2, 2, 12, "silu", 40),
]
SMOKE_VARIANTS = [
    "1,32,1",  # the current kernel's structure
    "2,32,1 acc1",
    "4,64,2 ir1",
    "4,64,2 ir2 acc1",
    "2,32,1 pf1",
    "2,32,1 pf2 acc1",
    "1,32,1 ir1 pf1 acc1",
    "2,64,2 ns2",
    "2,32,1 ir1 pf1 acc1 tok2",
    "8,32,1 pf2 tok4",
    "1,32,1 ir2 pf1 tok2 ev",
    "128,128,4 ir1 pf2 acc1 ns3",
    "2,16,1 acc1 pf1",  # d16: column tiles inside one core (CORE_UNIFORM) when D_v/h_c = 48
    "1,16,1 ir2 pf2 tok2 r64",  # (maxnreg: a compile option, a no-op in the interpreter)
]


def make_problem(name, t, n, d, hc, e, dp, act, p, device, dtype, seed=0) -> Problem:
    """A small random problem (CPU generator, then moved): the smoke shapes."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return Problem(
        name=name,
        values=rnd(p, d, scale=0.02),
        idx=torch.randint(0, p, (t, n), generator=g).to(device),
        scores=rnd(t, n, hc),
        block=torch.randint(0, e, (t, n), generator=g).to(device) if e > 1 else None,
        e=e,
        pre_values=rnd(p, dp, scale=0.05) if dp else None,
        pre_query=rnd(t, dp) if dp else None,
        act=act,
    )


def smoke(args) -> int:
    from ultramem.ops.lookup_reduce.reference import lookup_reduce as ref_lr

    cfgs = [parse_cfg(s) for s in SMOKE_VARIANTS]
    fails = 0
    t0 = time.perf_counter()
    for sh in SMOKE_SHAPES:
        pb = make_problem(*sh, device="cpu", dtype=torch.float32)
        dbl = lambda x: None if x is None else x.double()  # noqa: E731
        ref = ref_lr(pb.values.double(), pb.idx, pb.scores.double(), pb.block, pb.e,
                     dbl(pb.pre_values), dbl(pb.pre_query), pb.act)
        for cfg in cfgs:
            if args.variants and not re.search(args.variants, cfg.name):
                continue
            why = unsupported(cfg, pb)
            if why:
                print(f"{pb.name:>16} {cfg.name:<34} skip: {why}")
                continue
            out = new_out(pb)
            try:
                launcher(cfg, pb, out)()
                err = ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                ok = err < 1e-4
                msg = f"rel err {err:.2e}"
            except Exception as exc:  # noqa: BLE001 -- report and go on
                ok, msg = False, "raised: " + first_lines(exc)
            fails += not ok
            print(f"{pb.name:>16} {cfg.name:<34} {'ok  ' if ok else 'FAIL'} {msg}", flush=True)
    print(f"smoke: {fails} failure(s), {time.perf_counter() - t0:.1f} s")
    return 1 if fails else 0


# ---- GPU shapes and variant lists ------------------------------------------------------------
# (T, n, D_v, h_c, E, D_p, act, P) as the study; bf16 tables, uniform random rows
GPU_SHAPES = {
    "ive4": (1024, 84, 1024, 2, 4, 0, "identity", 1 << 20),
    "train151m": (16384, 32, 512, 2, 4, 0, "identity", 1100 ** 2),
    "pkm256": (4096, 32, 256, 1, 1, 0, "identity", 1 << 20),
    "v2-gelu": (4096, 32, 384, 1, 1, 128, "gelu", 1 << 20),
}
# decode of the 1.6B model (few tokens: _fwd_blocks's latency tiles), timed by CUDA-graph replay
DECODE_SHAPES = {
    "decode1.6b-t1": (1, 84, 1024, 2, 4, 0, "identity", 3_211_264),
    "decode1.6b-t64": (64, 84, 1024, 2, 4, 0, "identity", 3_211_264),
}
# compile-check only (meta tensors): shapes that reach the other branches of _fwd_blocks
BRANCH_SHAPES = {
    "decode-pkm-t1": (1, 32, 256, 1, 1, 0, "identity", 1 << 20),
    "decode-v2-t1": (1, 32, 384, 1, 1, 128, "gelu", 1 << 20),
    "medium-v2-t64": (64, 32, 384, 1, 1, 128, "silu", 1 << 20),
    "ive-mcs3-d768": (1024, 84, 768, 3, 4, 0, "identity", 1 << 20),  # tiles straddle cores
    "train-n256": (16384, 256, 512, 2, 4, 0, "identity", 1100 ** 2),  # ir -> pf2
    "pkm-n256": (4096, 256, 256, 1, 1, 0, "identity", 1 << 20),  # ir -> pf1
    "v2-dp256": (4096, 32, 384, 1, 1, 256, "silu", 1 << 20),  # n2 pf1
    "v2-dp300": (4096, 32, 384, 1, 1, 300, "gelu", 1 << 20),  # PRE_TILED
}
ALL_SHAPES = {**GPU_SHAPES, **DECODE_SHAPES, **BRANCH_SHAPES}
# production kernel (lookup_reduce impl="triton") at other tiles: ULTRAMEM_LR_FWD_BLOCKS format
# "BLOCK_N,BLOCK_D,warps[,pf[,ir[,ns[,ev[,acc]]]]]"; rows "prod [...]" next to "prod (default)"
PROD_ALTS = {
    "ive4": ["1,256,1,1", "1,256,1,2", "1,512,2,2,0,1,1"],
    "train151m": ["1,256,1,2", "1,256,1,1,2", "1,512,2,2"],
    "pkm256": ["4,256,1", "8,256,1,0,1", "4,256,1,1,1"],
    "v2-gelu": ["2,512,2,1", "2,512,2,2", "4,512,2,1"],
    "decode1.6b-t1": ["128,32,8,0,0,1,0,1", "128,64,8,0,0,1,0,0", "128,32,4,0,0,1,0,0",
                      "128,16,8,0,0,1,0,0", "128,32,8,0,0,1,1,0"],
    "decode1.6b-t64": ["16,128,4,0,0,1,0,1", "16,128,4,1,0,1,0,0", "32,128,4,0,0,1,0,0",
                       "16,256,4,0,0,1,0,0", "8,128,2,0,0,1,0,0", "16,128,4,0,1,1,0,0"],
}

# Rationale. Every switch is tried alone on the best tile known for the shape, then combined
# with steps that put more bytes in flight per program (BLOCK_N 2-8, TOK 2), whose register
# cost (noted per shape from --compile-check, Triton 3.9 for sm_90) decides how many programs
# stay resident: per SM min(32, 64 / warps, 65536 / (regs * 32 * warps)). ACC 1 is the default
# for E > 1 (no [E, BLOCK_N, BLOCK_D] accumulator); BLOCK_D = 256 * warps keeps a tile's rows in
# one thread; BLOCK_D dividing D_v / h_c makes the MCS score one per row (CORE_UNIFORM).
GPU_VARIANTS = {
    "ive4": [  # 84 steps/program; d256 w1: 4096 programs, one wave if <= 64 registers
        "1,256,1", "1,256,1 acc1", "1,256,1 acc1 pf1", "1,256,1 acc1 pf2", "1,256,1 acc1 ir1",
        "1,256,1 acc1 ir2", "1,256,1 acc1 ir1 pf1", "1,256,1 acc1 ir2 pf1", "1,256,1 acc1 ns2",
        "1,256,1 acc1 ns3", "1,256,1 acc1 ir2 ns3", "1,256,1 acc1 pf2 ev",
        "1,256,1 acc1 ir2 pf1 ev",
        "2,256,1 acc1", "2,256,1 acc1 pf1", "2,256,1 acc1 pf2", "2,256,1 acc1 pf2 r64",
        "2,256,1 acc1 ir2 pf1", "2,256,1 acc1 ir2 pf1 r64", "2,256,1 acc1 ns3",
        "4,256,1 acc1 pf2",
        "1,256,1 acc1 pf2 tok2", "1,256,1 acc1 ir2 pf1 tok2",
        "1,128,1 acc1 pf1", "2,128,1 acc1 pf2", "4,128,1 acc1 pf2",
        "1,512,2 acc1 pf1", "1,512,2 acc1 pf2", "2,512,2 acc1 pf2",
        "1,1024,4 acc1 pf2", "2,1024,4 acc1 pf2",
    ],
    "train151m": [  # 32 steps/program; d512 w2: 16384 programs (~4 waves); d256: one core/tile
        "1,512,2", "1,512,2 acc1", "1,512,2 acc1 pf1", "1,512,2 acc1 pf2", "1,512,2 acc1 ir1",
        "1,512,2 acc1 ir2", "1,512,2 acc1 ir1 pf1", "1,512,2 acc1 ir2 pf1", "1,512,2 acc1 ns2",
        "1,512,2 acc1 ns3", "1,512,2 acc1 ir1 ns3", "1,512,2 acc1 ir1 pf1 ev",
        "2,512,2 acc1 pf1", "2,512,2 acc1 pf2", "2,512,2 acc1 ir1 pf1",
        "2,512,2 acc1 ir1 pf1 r64",
        "1,512,2 acc1 ir1 pf1 tok2", "1,512,2 acc1 pf2 tok2",
        "1,256,1", "1,256,1 acc1 pf1", "1,256,1 acc1 pf2", "1,256,1 acc1 ir1 pf1",
        "1,256,1 acc1 ir2 pf1", "1,256,1 acc1 ir1 ns3", "2,256,1 acc1 ir1 pf1",
        "2,256,1 acc1 pf2", "1,256,1 acc1 ir1 pf1 tok2", "1,256,2 acc1 ir1 pf1",
        "1,512,4 acc1 ir1 pf1", "2,512,4 acc1 ir1 pf1",
    ],
    "pkm256": [  # tiny (70 MB): 4096 tokens x 32 rows of 512 B; latency / tail bound
        "8,128,2", "8,128,2 acc1", "8,128,2 pf1", "8,128,2 pf2", "8,128,2 ir1",
        "8,128,2 ir1 pf1", "8,128,2 ir2 pf1", "8,128,2 ns2", "8,128,2 ns3", "8,128,2 ir1 pf1 ev",
        "2,256,1 acc1 ir1 pf1", "4,256,1 acc1", "4,256,1 acc1 pf1", "4,256,1 acc1 pf2",
        "4,256,1 acc1 ir1 pf1", "4,256,1 acc1 ir2 pf1", "4,256,1 acc1 ns3",
        "8,256,1 acc1 ir1", "8,256,1 acc1 ir1 pf1", "8,256,1 acc1 pf1 r64",
        "8,256,2 acc1 ir1 pf1", "16,256,2 acc1 ir1", "16,256,2 acc1 ir1 pf1",
        "32,256,2 acc1 ir1", "32,256,4 acc1 ir1",
        "2,256,1 acc1 ir1 pf1 tok2", "4,256,1 acc1 ir1 pf1 tok2",
        "4,128,1 acc1 ir1 pf1", "8,128,1 acc1 ir1 pf1", "16,128,2 acc1 ir1 pf1",
    ],
    "v2-gelu": [  # D_v 384: d512 reads each pre-value row once, d128 / d256 re-read it
        "2,512,2", "2,512,2 acc1", "2,512,2 acc1 pf1", "2,512,2 acc1 pf2",
        "2,512,2 acc1 ir1 pf1", "2,512,2 acc1 ir2 pf1", "1,512,2 acc1 ir1 pf1",
        "1,512,2 acc1 pf2", "4,512,2 acc1 ir1 pf1", "4,512,2 acc1 pf2",
        "4,512,2 acc1 ir1 pf1 r64", "2,512,2 acc1 ns3", "2,512,2 acc1 ir1 ns3",
        "2,512,2 acc1 ir1 pf1 ev", "1,512,2 acc1 ir1 pf1 tok2", "2,512,2 acc1 ir1 pf1 tok2",
        "2,512,4 acc1 ir1 pf1", "4,512,4 acc1 ir1 pf1", "8,512,4 acc1 ir1",
        "8,512,4 acc1 ir1 pf1", "2,256,1 acc1 ir1 pf1", "4,256,1 acc1 ir1 pf1",
        "2,256,1 acc1 pf2", "4,128,1 acc1 ir1 pf1", "8,128,2 acc1 ir1 pf1", "8,128,2",
        "16,128,4 acc1 ir1",
    ],
}


def gpu_problem(name: str, device="cuda") -> Problem:
    t, n, d, hc, e, dp, act, p = ALL_SHAPES[name]
    bf = torch.bfloat16
    return Problem(
        name=name,
        values=torch.randn(p, d, device=device, dtype=bf) * 0.02,
        idx=torch.randint(0, p, (t, n), device=device),
        scores=torch.randn(t, n, hc, device=device, dtype=bf),
        block=torch.randint(0, e, (t, n), device=device) if e > 1 else None,
        e=e,
        pre_values=torch.randn(p, dp, device=device, dtype=bf) * 0.05 if dp else None,
        pre_query=torch.randn(t, dp, device=device, dtype=bf) if dp else None,
        act=act,
    )


def meta_problem(name: str) -> Problem:
    """A problem with the shape of a GPU one but tiny (meta) tensors: enough for ``kernel_call``
    (strides, sizes, dtypes) without memory, for compile-only jobs."""
    t, n, d, hc, e, dp, act, p = ALL_SHAPES[name]
    bf, i64 = torch.bfloat16, torch.int64
    m = dict(device="meta")
    return Problem(name, torch.empty(p, d, dtype=bf, **m), torch.empty(t, n, dtype=i64, **m),
                   torch.empty(t, n, hc, dtype=bf, **m),
                   torch.empty(t, n, dtype=i64, **m) if e > 1 else None, e,
                   torch.empty(p, dp, dtype=bf, **m) if dp else None,
                   torch.empty(t, dp, dtype=bf, **m) if dp else None, act)


def selected(args) -> list[tuple[str, list[Cfg]]]:
    timed = {**GPU_SHAPES, **DECODE_SHAPES}
    names = [s for s in args.shapes.split(",") if s] if args.shapes else list(timed)
    for s in names:
        if s not in timed:
            raise SystemExit(f"unknown shape {s!r}; have {', '.join(timed)}")
    out = []
    for s in names:
        cfgs = [parse_cfg(v) for v in GPU_VARIANTS.get(s, [])]
        if args.variants:
            cfgs = [c for c in cfgs if re.search(args.variants, c.name)]
        out.append((s, list(dict.fromkeys(cfgs))))
    return out


# ---- compile-only: sm_90 from the CPU, and the GPU run's parallel warm-up ----------------------
def compile_sm90(job) -> tuple[str, str, str]:
    """Compile one ``(shape, cfg)`` for sm_90 without a GPU: ``(shape, name, result)``."""
    shape, cfg = job
    pb = meta_problem(shape)
    why = unsupported(cfg, pb)
    if why:
        return shape, cfg.name, "skip: " + why
    _, args, kwargs = kernel_call(cfg, pb, new_out(pb))
    try:
        ck = _bench.compile_sm90(_sweep_kernel, args, kwargs)
        return shape, cfg.name, "ok " + resource_usage(ck.asm.get("cubin"))
    except Exception as exc:  # noqa: BLE001 -- report every failing variant
        return shape, cfg.name, "FAIL " + first_lines(exc)


def loop_sync(ptx: str) -> str:
    """Barriers and shared-memory accesses inside loops of a PTX listing (a loop: from a label
    to a later branch back to it), and in all: ``bar in-loop/all, shared in-loop/all``."""
    lines = ptx.splitlines()
    labels, spans = {}, []
    for i, ln in enumerate(lines):
        m = re.match(r"\s*(\$L__\w+):", ln)
        if m:
            labels[m[1]] = i
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", ln)
        if m and m[1] in labels:
            spans.append((labels[m[1]], i))

    def count(pat):
        hits = [i for i, ln in enumerate(lines) if re.search(pat, ln)]
        return sum(any(a <= i <= b for a, b in spans) for i in hits), len(hits)

    bi, ba = count(r"\bbar\.sync|\bbarrier\.sync")
    si, sa = count(r"\b(ld|st)\.shared")
    return f"bar.sync loop {bi}/all {ba}, shared ld/st loop {si}/all {sa}"


def prod_cfg_name(shape: str, blocks: str | None = None) -> str:
    """The production config ``_fwd_blocks`` returns for a shape (under an override)."""
    import importlib

    lrk = importlib.import_module("ultramem.ops.lookup_reduce.triton")
    t, n, d, hc, e, dp, act, p = ALL_SHAPES[shape]
    lrk.FWD_BLOCKS = blocks
    try:
        c = lrk._fwd_blocks(t, d, n, e, dp)
    finally:
        lrk.FWD_BLOCKS = None
    ir = c.ir if _pow2(n) <= 128 else 0
    return (f"n{c.bn} d{c.bd} w{c.w}" + (f" pf{c.pf}" if c.pf else "") + (f" ir{ir}" if ir else "")
            + (f" ns{c.ns}" if c.ns > 1 else "") + (" ev" if c.ev else "") + f" acc{c.acc}")


def compile_prod(job) -> tuple[str, str, str]:
    """Compile the production kernel for one ``(shape, blocks)`` (``blocks``: an
    ``ULTRAMEM_LR_FWD_BLOCKS`` string, None = default tiles, "old" = the previous kernel)."""
    import importlib

    shape, blocks = job
    lrk = importlib.import_module("ultramem.ops.lookup_reduce.triton")
    pb = meta_problem(shape)
    label = "old kernel" if blocks == "old" else prod_cfg_name(shape, blocks)
    try:
        if blocks == "old":
            ck = _compile_old(pb)
        else:
            lrk.FWD_BLOCKS = blocks
            try:
                _, args, kwargs = lrk._fwd_launch(pb.values, pb.idx, pb.scores, pb.block, pb.e,
                                                  pb.pre_values, pb.pre_query, pb.act,
                                                  new_out(pb))
            finally:
                lrk.FWD_BLOCKS = None
            ck = _bench.compile_sm90(lrk._fwd_kernel, args, kwargs)
        return shape, label, ("ok " + resource_usage(ck.asm.get("cubin")) + "; "
                              + loop_sync(ck.asm.get("ptx", "")))
    except Exception as exc:  # noqa: BLE001
        return shape, label, "FAIL " + first_lines(exc)


def _compile_old(pb: Problem):
    """The previous kernel at its default tiles (as ``_old_forward``), compiled for sm_90."""
    t, n = pb.idx.shape
    hc = pb.scores.shape[-1]
    d_v = pb.values.shape[1]
    e, has_pre = pb.e, pb.pre_values is not None
    work = t * triton.cdiv(d_v, 128)
    if work < 64:
        bn, bd, w = _p2(n, 1, 128), _p2(d_v, 16, 64 if e == 1 else 32), 8
    elif work < 1024:
        bn, bd, w = _p2(n, 1, 16), _p2(d_v, 16, 128), 4
    else:
        bn, bd, w = _p2(n, 1, 2 if e == 1 else 1), _p2(d_v, 16, 256), 1
    d_p = pb.pre_values.shape[1] if has_pre else 1
    args = (pb.values, pb.idx, pb.scores, pb.block if e > 1 else pb.idx,
            pb.pre_values if has_pre else pb.values, pb.pre_query if has_pre else pb.values,
            new_out(pb), n, d_v, d_p, pb.values.stride(0),
            pb.pre_values.stride(0) if has_pre else 0, pb.pre_query.stride(0) if has_pre else 0)
    kwargs = dict(HC=hc, DC=d_v // hc, E=e, E_PAD=_p2(e), HAS_PRE=has_pre, ACT=ACT_CODES[pb.act],
                  BLOCK_N=bn, BLOCK_D=bd, BLOCK_P=_p2(d_p, 16, 64 if has_pre and bn > 16 else 128),
                  num_warps=w)
    return _bench.compile_sm90(_old_fwd_kernel, args, kwargs)


def compile_check_prod(args) -> int:
    """Every config ``_fwd_blocks`` returns on ALL_SHAPES, the PROD_ALTS, and the previous kernel
    on the timed shapes, compiled for sm_90."""
    jobs = []
    for s in ALL_SHAPES:
        if args.shapes and s not in args.shapes.split(","):
            continue
        jobs.append((s, None))
        jobs += [(s, b) for b in PROD_ALTS.get(s, [])]
        if s in GPU_SHAPES or s in DECODE_SHAPES:
            jobs.append((s, "old"))
    print(f"compile-check-prod: {len(jobs)} configs for sm_90 (Triton {triton.__version__})",
          flush=True)
    t0 = time.perf_counter()
    fails = 0
    for (shape, label, res), (_, blocks) in zip(run_pool(compile_prod, jobs, args.jobs), jobs):
        fails += res.startswith("FAIL")
        tag = "default" if blocks is None else ("" if blocks == "old" else f"[{blocks}]")
        print(f"{shape:>15} {tag:<22} {label:<28} {res}", flush=True)
    print(f"compile-check-prod: {fails} failure(s) of {len(jobs)}, "
          f"{time.perf_counter() - t0:.0f} s")
    return 1 if fails else 0


def resource_usage(cubin: bytes | None) -> str:
    """``REG:n STACK:n LOCAL:n`` from ``cuobjdump --dump-resource-usage`` (if it is there)."""
    import shutil
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if not cubin or not tool:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            txt = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                                 text=True, timeout=30).stdout
        except Exception:  # noqa: BLE001
            return ""
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", txt)
    return f"regs {m[1]} stack {m[2]} smem {m[3]} local {m[4]}" if m else ""


def compile_check(args) -> int:
    jobs = [(s, c) for s, cfgs in selected(args) for c in cfgs]
    print(f"compile-check: {len(jobs)} variants for sm_90 (Triton {triton.__version__})", flush=True)
    t0 = time.perf_counter()
    results = run_pool(compile_sm90, jobs, args.jobs)
    fails = 0
    for shape, name, res in results:
        fails += res.startswith("FAIL")
        print(f"{shape:>10} {name:<34} {res}", flush=True)
    print(f"compile-check: {fails} failure(s) of {len(jobs)}, {time.perf_counter() - t0:.0f} s")
    return 1 if fails else 0


def warm_one(job) -> str | None:
    """Compile one variant through the JIT (``warmup``: no launch) into the disk cache, with the
    same specialisation as the timed run (dtypes and integer arguments)."""
    shape, cfg = job
    try:
        pb = meta_problem(shape)
        if unsupported(cfg, pb):
            return None
        grid, args, kwargs = kernel_call(cfg, pb, new_out(pb))
        args = [a.dtype if isinstance(a, torch.Tensor) else a for a in args]
        _sweep_kernel.warmup(*args, grid=grid, **kwargs)
        return None
    except Exception as exc:  # noqa: BLE001 -- the timed process reports it again
        return first_lines(exc)


def warm_prod(job) -> str | None:
    """As :func:`warm_one` for the production kernel at ``(shape, blocks)``."""
    import importlib

    shape, blocks = job
    lrk = importlib.import_module("ultramem.ops.lookup_reduce.triton")
    try:
        pb = meta_problem(shape)
        lrk.FWD_BLOCKS = blocks
        grid, args, kwargs = lrk._fwd_launch(pb.values, pb.idx, pb.scores, pb.block, pb.e,
                                             pb.pre_values, pb.pre_query, pb.act, new_out(pb))
        args = [a.dtype if isinstance(a, torch.Tensor) else a for a in args]
        lrk._fwd_kernel.warmup(*args, grid=grid, **kwargs)
        return None
    except Exception as exc:  # noqa: BLE001 -- the timed process reports it again
        return first_lines(exc)
    finally:
        lrk.FWD_BLOCKS = None


def run_pool(fn, jobs, n_jobs):
    """``[fn(job) for job in jobs]``, in ``n_jobs`` spawned processes when n_jobs > 1."""
    if n_jobs <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    import concurrent.futures as cf
    import multiprocessing as mp

    try:
        with cf.ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn")) as ex:
            return list(ex.map(fn, jobs))
    except Exception as exc:  # noqa: BLE001 -- fall back to one process
        print(f"process pool failed ({first_lines(exc, 1)}); compiling serially", flush=True)
        return [fn(j) for j in jobs]


# ---- GPU sweep -------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    return _bench.copy_gbps("cuda", torch.bfloat16, _bench.do_bench)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def sweep_shape(shape: str, cfgs: list[Cfg], copy: float, rows: list[dict]) -> None:
    """Time the production kernel (``impl="triton"``: default tiles, then PROD_ALTS) and the
    previous kernel on one shape, then check every sweep variant against the production output
    and time the ones that match. Decode shapes: CUDA-graph replay (20 calls, median of 25)."""
    import importlib

    from ultramem.ops.lookup_reduce import lookup_reduce

    lrk = importlib.import_module("ultramem.ops.lookup_reduce.triton")  # FWD_BLOCKS knob only
    torch.manual_seed(0)
    pb = gpu_problem(shape)
    nbytes = pb.fwd_bytes()
    spec = dict(zip(("T", "n", "D_v", "h_c", "E", "D_p", "act", "P"), ALL_SHAPES[shape]))
    decode = shape in DECODE_SHAPES
    timer = _bench.graph_time if decode else bench  # decode: launch overhead matters, CUDA graphs

    def emit(variant, ms=None, **extra):
        row = {"shape": shape, **spec, "variant": variant, "bytes": nbytes, **extra}
        if ms is not None:
            gbps = nbytes / ms / 1e6
            row.update(us=round(ms * 1e3, 2), GBps=round(gbps, 1),
                       frac_of_copy=round(gbps / copy, 3))
            print(f"{shape:>14} {variant:<44} {ms * 1e3:9.2f} us {gbps:7.0f} GB/s "
                  f"{gbps / copy:6.3f}  {extra.get('note', '')}", flush=True)
        else:
            print(f"{shape:>14} {variant:<44} {extra.get('note', '')}", flush=True)
        rows.append(row)

    def base_fn():
        return lookup_reduce(pb.values, pb.idx, pb.scores, pb.block, pb.e, pb.pre_values,
                             pb.pre_query, pb.act, impl="triton")

    def old_fn():
        return _old_forward(pb.values, pb.idx, pb.scores, pb.block, pb.e, pb.pre_values,
                            pb.pre_query, pb.act)

    ref = base_fn().float()
    torch.cuda.synchronize()
    # the production kernel: default tiles, then the alternatives (same code path, override)
    emit(f"prod default ({prod_cfg_name(shape)})", timer(base_fn),
         timer="graph" if decode else "do_bench")
    for blocks in PROD_ALTS.get(shape, []):
        lrk.FWD_BLOCKS = blocks
        try:
            diff = (base_fn().float() - ref).abs().max().item()
            emit(f"prod [{blocks}] ({prod_cfg_name(shape, blocks)})", timer(base_fn),
                 max_abs_diff=diff, note=f"max |diff| vs default {diff:.3g}")
        except Exception as exc:  # noqa: BLE001
            emit(f"prod [{blocks}]", ok=False, note="raised: " + first_lines(exc))
        finally:
            lrk.FWD_BLOCKS = None
    diff = (old_fn().float() - ref).abs().max().item()  # the previous kernel, for comparison
    emit("old kernel (old default tiles)", timer(old_fn), max_abs_diff=diff,
         note=f"max |diff| vs prod {diff:.3g}")
    for cfg in cfgs:
        why = unsupported(cfg, pb)
        if why:
            emit(cfg.name, ok=False, note="skip: " + why)
            continue
        out = new_out(pb)
        try:
            fn = launcher(cfg, pb, out)
            ck = fn()
            torch.cuda.synchronize()
            diff = (out.float() - ref).abs().max().item()
            ok = bool(torch.allclose(out.float(), ref, rtol=2e-2, atol=2e-3))
        except Exception as exc:  # noqa: BLE001 -- one bad variant must not stop the sweep
            emit(cfg.name, ok=False, note="raised: " + first_lines(exc))
            continue
        regs = {k: getattr(ck, k, None) for k in ("n_regs", "n_spills")}
        if not ok:
            emit(cfg.name, ok=False, max_abs_diff=diff, **regs,
                 note=f"MISMATCH max |diff| {diff:.3g} (not timed)")
            continue
        try:
            ms = bench(fn)
        except Exception as exc:  # noqa: BLE001
            emit(cfg.name, ok=False, note="raised while timing: " + first_lines(exc))
            continue
        emit(cfg.name, ms, ok=True, max_abs_diff=diff, config=cfg.__dict__, **regs,
             note=f"regs {regs['n_regs']} spills {regs['n_spills']}")


def gpu_sweep(args) -> int:
    t_all = time.perf_counter()
    device = torch.cuda.get_device_name()
    print(f"device {device}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    plan = selected(args)
    if args.jobs > 1:  # compile everything in parallel into the disk cache first
        t0 = time.perf_counter()
        jobs = [(s, c) for s, cfgs in plan for c in cfgs]
        errs = [e for e in run_pool(warm_one, jobs, args.jobs) if e]
        pjobs = [(s, b) for s, _ in plan for b in [None, *PROD_ALTS.get(s, [])]]
        errs += [e for e in run_pool(warm_prod, pjobs, args.jobs) if e]
        jobs += pjobs
        print(f"parallel compile of {len(jobs)} variants ({args.jobs} processes): "
              f"{time.perf_counter() - t0:.0f} s, {len(errs)} error(s)", flush=True)
    copy = copy_bandwidth()
    torch.cuda.empty_cache()
    rows: list[dict] = []
    for shape, cfgs in plan:
        t0 = time.perf_counter()
        with torch.no_grad():
            sweep_shape(shape, cfgs, copy, rows)
        torch.cuda.empty_cache()
        print(f"{shape}: {len(cfgs)} variants, {time.perf_counter() - t0:.1f} s", flush=True)

    print("best per shape:")
    for shape, _ in plan:
        timed = [r for r in rows if r["shape"] == shape and "us" in r]
        if timed:
            b = min(timed, key=lambda r: r["us"])
            print(f"  {shape:>10} {b['variant']:<34} {b['us']:.1f} us "
                  f"{b['frac_of_copy']:.3f} of copy")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "lr_fwd_sweep.json")
    with open(path, "w") as f:
        json.dump({"device": device, "copy_GBps": round(copy, 1),
                   "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                   "torch": torch.__version__, "triton": triton.__version__, "rows": rows}, f,
                  indent=1)
    print(f"wrote {path}; total {time.perf_counter() - t_all:.0f} s")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter check vs fp64 reference")
    ap.add_argument("--compile-check", action="store_true",
                    help="compile every GPU variant for sm_90 on the CPU (no run)")
    ap.add_argument("--compile-check-prod", action="store_true",
                    help="compile the production kernel's configs (and the old kernel) for sm_90")
    ap.add_argument("--out", default="docs/results", help="directory of lr_fwd_sweep.json")
    ap.add_argument("--shapes", default="", help="comma-separated: " + ",".join(GPU_SHAPES))
    ap.add_argument("--variants", default="", help="regex on variant names (re.search)")
    ap.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1),
                    help="compile processes (1: compile in the timed process)")
    args = ap.parse_args()
    if args.smoke:
        return smoke(args)
    if args.compile_check:
        return compile_check(args)
    if args.compile_check_prod:
        return compile_check_prod(args)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --smoke or --compile-check")
    return gpu_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
