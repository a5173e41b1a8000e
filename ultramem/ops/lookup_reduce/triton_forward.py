"""Triton forward kernel of lookup-reduce (docs/math.md §7; semantics: ``reference.py``).

``values [P, D_v]``, ``idx [T, n]``, ``scores [T, n, h_c]``, ``block [T, n]``, ``pre_values [P,
D_p]``, ``pre_query [T, D_p]`` -> ``out [T, E, D_v]``. :func:`_fwd_kernel`, grid ``(T, D_v /
BLOCK_D)``: a program owns one token and one column tile, gathers ``BLOCK_N`` selected rows a
step, weights column d by ``scores[t, j, d // (D_v/h_c)]`` (MCS) times the fused V2 pre-value
activation ``act(<pre_query[t], pre_values[idx]>)``, and accumulates in fp32 into ``[E,
BLOCK_D]``, one plane per virtual block (IVE). The tile and its compile-time switches are
chosen per shape class by :func:`_fwd_blocks` (measurements: docs/kernels.md, Lookup-reduce):

- ``ACC`` 1: each step's rows summed at once into ``[E_PAD, BLOCK_D]``; 0: an elementwise
  ``[E_PAD, BLOCK_N, BLOCK_D]`` accumulator reduced at the end (decode tiles, rows across warps).
- ``PREFETCH`` 1: the gather of step j+1 is issued before step j accumulates; 2: also the
  indices of step j+2 a step earlier.
- ``IDX_REGS`` 1 / 2: the token's selections loaded once, packed ``[N_PAD, K]`` int32 (word 0 =
  row * E_PAD + block, words 1..h_c = the fp32 score bits), extracted per step by a masked sum
  (1) or ``tl.gather`` (2); needs n <= 128 and P * E_PAD < 2^31.
- ``NS``: ``tl.range(num_stages=NS)``, Triton's pipeliner, on the selection loop.
- ``EVICT``: ``evict_first`` on the table gathers (rows are not reused; L2 keeps the indices).
- ``CORE_UNIFORM`` (automatic): the tile lies in one MCS core, one score per row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ultramem.ops.tuning import TUNING

ACT_CODES = {"identity": 0, "gelu": 1, "silu": 2}


@triton.jit
def act(x, ACT: tl.constexpr):
    if ACT == 1:  # exact (erf) GELU, as torch.nn.functional.gelu
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        return x / (1.0 + tl.exp(-x))
    else:
        return x


@triton.jit
def pre_dot(u_ptr, q_ptr, rows, mask_n, t, D_P, stride_u, stride_q,
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
            u = pre_dot(u_ptr, q_ptr, rows, mask_n, t, D_P, stride_u, stride_q,
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
        s_row = s_row * act(dot, ACT)
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

def pow2(x: int, lo: int = 1, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(int(x), 1)))
    return min(p, hi) if hi is not None else p



FWD_PRE_TILE = 256  # wider pre-values are dotted by a loop over chunks (PRE_TILED)


class FwdCfg(NamedTuple):
    """Tile and switches of :func:`_fwd_kernel` (see the module docstring)."""

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
    if TUNING.lookup_fwd_tile:  # (BLOCK_N, BLOCK_D, warps[, pf, ir, ns, ev, acc]): a cap
        f = list(TUNING.lookup_fwd_tile)
        f += [0, 0, 1, 0, 1][len(f) - 3:] if len(f) < 8 else []
        return FwdCfg(pow2(n, 1, f[0]), pow2(d_v, 16, f[1]), *f[2:8])
    work = t * triton.cdiv(d_v, 128)
    if work < 64:  # a few tokens: all selections in one step, narrow column tiles
        return FwdCfg(pow2(n, 1, 128), pow2(d_v, 16, 64 if e == 1 else 32), 8, acc=0)
    if work < 1024:
        return FwdCfg(pow2(n, 1, 16), pow2(d_v, 16, 128), 4, acc=0)
    small_n = n <= 128  # IDX_REGS possible
    if e > 1:
        if d_v >= 1024:  # ive4 (D_v 1024, E 4): 0.670 of copy
            return FwdCfg(1, 256, 1, pf=2, ev=1)
        if small_n:  # train151m (D_v 512, E 4): 0.801
            return FwdCfg(1, pow2(d_v, 16, 256), 1, ir=1, ns=3)
        return FwdCfg(1, pow2(d_v, 16, 256), 1, pf=2)  # train151m without ir: 0.730
    if d_p:  # v2-gelu (D_v 384, D_p 128): n4 0.683; wide pre-values (more registers): n2
        if d_p <= 128:
            return FwdCfg(pow2(n, 1, 4), pow2(d_v, 16, 512), 2, pf=2)
        return FwdCfg(pow2(n, 1, 2), pow2(d_v, 16, 512), 2, pf=1)
    if small_n:  # pkm256 (D_v 256): 0.637
        return FwdCfg(pow2(n, 1, 4), pow2(d_v, 16, 256), 1, pf=1, ir=2)
    return FwdCfg(pow2(n, 1, 4), pow2(d_v, 16, 256), 1, pf=1)


def _fwd_launch(values, idx, scores, block, e, pre_values, pre_query, activation, out):
    """``(grid, args, kwargs)`` of :func:`_fwd_kernel` (tests check it on meta tensors)."""
    t, n = idx.shape
    h_c = scores.shape[-1]
    p, d_v = values.shape
    has_pre = pre_values is not None
    d_p = pre_values.shape[1] if has_pre else 1
    cfg = _fwd_blocks(t, d_v, n, e, d_p if has_pre else 0)
    e_pad = pow2(e)
    ir = cfg.ir if pow2(n) <= 128 and p * e_pad < 2**31 else 0
    # one pre-value tile per step unless it is wide or the step has many rows (decode: 128
    # rows x 64-column chunks, as the previous kernel)
    pre_tiled = has_pre and (d_p > FWD_PRE_TILE or cfg.bn * pow2(d_p) > 4096)
    if not has_pre:
        block_p = 16
    elif pre_tiled:
        block_p = pow2(d_p, 16, 64 if cfg.bn > 16 else 128)
    else:
        block_p = pow2(d_p, 16)
    grid = (t, triton.cdiv(d_v, cfg.bd))
    args = (values, idx, scores, block if e > 1 else idx, pre_values if has_pre else values,
            pre_query if has_pre else values, out, n, d_v, d_p, values.stride(0),
            pre_values.stride(0) if has_pre else 0, pre_query.stride(0) if has_pre else 0)
    kwargs = dict(HC=h_c, K=pow2(h_c + 1), DC=d_v // h_c, E=e, E_PAD=e_pad, HAS_PRE=has_pre,
                  PRE_TILED=pre_tiled, ACT=ACT_CODES[activation], BLOCK_N=cfg.bn,
                  BLOCK_D=cfg.bd, BLOCK_P=block_p, N_PAD=pow2(n), IDX_REGS=ir,
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

