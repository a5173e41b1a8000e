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
The pre-value gradients reuse the same kernels: ``d pre_query`` is a lookup-reduce of the
pre-value table weighted by ``ddot``; ``d pre_values`` is the value-gradient scatter of
``pre_query`` weighted by ``ddot``.
"""

from __future__ import annotations

import os

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


@triton.jit
def _fwd_kernel(
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
        if E > 1:
            blk = tl.load(blk_ptr + sel, mask=mask_n, other=0).to(tl.int64)
        else:
            blk = tl.zeros([BLOCK_N], dtype=tl.int64)
        w = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for c in tl.static_range(HC):
            w_c = tl.load(w_ptr + sel * HC + c, mask=mask_n, other=0.0)
            w = tl.where((core == c)[None, :], w_c[:, None], w)
        m2 = mask_n[:, None] & mask_d[None, :]
        go = tl.load(go_ptr + ((t * E + blk) * D_V)[:, None] + offs_d[None, :], mask=m2,
                     other=0.0).to(tl.float32)
        tl.atomic_add(dv_ptr + rows[:, None] * D_V + offs_d[None, :], w * go, mask=m2)


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
        t = sel // N_SEL
        if E > 1:
            blk = tl.load(blk_ptr + sel, mask=mj, other=0).to(tl.int64)
        else:
            blk = tl.zeros([BLOCK_S], dtype=tl.int64)
        w = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
        for c in tl.static_range(HC):
            w_c = tl.load(w_ptr + sel * HC + c, mask=mj, other=0.0)
            w = tl.where((core == c)[None, :], w_c[:, None], w)
        m2 = mj[:, None] & mask_d[None, :]
        go = tl.load(go_ptr + ((t * E + blk) * D_V)[:, None] + offs_d[None, :], mask=m2,
                     other=0.0).to(tl.float32)
        acc += w * go
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


def _pow2(x: int, lo: int = 1, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(int(x), 1)))
    return min(p, hi) if hi is not None else p


SORT_BLOCK_S = 16  # sorted positions per program of the segment-reduce kernel
SORT_PIECE = 64  # occurrences summed serially per piece; hotter rows are staged in fp32
FWD_BLOCKS = os.environ.get("ULTRAMEM_LR_FWD_BLOCKS")  # "BLOCK_N,BLOCK_D,num_warps" override


def _fwd_blocks(t: int, d_v: int, n: int, e: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_D, num_warps)``: few tokens (decode) -> narrow column tiles and all
    selections of a token loaded at once (latency); many tokens -> wide tiles, 16 rows a step."""
    if FWD_BLOCKS:
        bn, bd, w = (int(x) for x in FWD_BLOCKS.split(","))
        return _pow2(n, 1, bn), _pow2(d_v, 16, bd), w
    work = t * triton.cdiv(d_v, 128)
    if work < 64:  # a few tokens: all selections in one step, narrow column tiles
        return _pow2(n, 1, 128), _pow2(d_v, 16, 64 if e == 1 else 32), 8
    if work < 1024:
        return _pow2(n, 1, 16), _pow2(d_v, 16, 128), 4
    # many tokens (measured on H200, docs/kernels.md): short steps, few warps per program,
    # so that many programs (and their gathers) are in flight on each SM
    return _pow2(n, 1, 2 if e == 1 else 1), _pow2(d_v, 16, 256), 1


def forward(values, idx, scores, block, num_blocks, pre_values, pre_query, activation,
            out_dtype=None):
    """``out [T, E, D_v]``; ``scores [T, n, h_c]`` (any float dtype), ``idx [T, n]``."""
    t, n = idx.shape
    h_c = scores.shape[-1]
    p, d_v = values.shape
    e = num_blocks if block is not None else 1
    out = torch.empty(t, e, d_v, device=values.device, dtype=out_dtype or values.dtype)
    if t == 0:
        return out
    has_pre = pre_values is not None
    block_n, block_d, warps = _fwd_blocks(t, d_v, n, e)
    d_p = pre_values.shape[1] if has_pre else 1
    grid = (t, triton.cdiv(d_v, block_d))
    _fwd_kernel[grid](
        values, idx, scores, block if e > 1 else idx, pre_values if has_pre else values,
        pre_query if has_pre else values, out,
        n, d_v, d_p, values.stride(0), pre_values.stride(0) if has_pre else 0,
        pre_query.stride(0) if has_pre else 0,
        HC=h_c, DC=d_v // h_c, E=e, E_PAD=_pow2(e), HAS_PRE=has_pre,
        ACT=ACT_CODES[activation], BLOCK_N=block_n, BLOCK_D=block_d,
        BLOCK_P=_pow2(d_p, 16, 64 if has_pre and block_n > 16 else 128), num_warps=warps,
    )
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


def scatter_rows(num_rows, idx, w, block, num_blocks, grad_out, dtype, method="sort"):
    """``dV [num_rows, D_v]`` with ``dV[idx[t,j], c-slice] += w[t,j,c] * grad_out[t, block, c-slice]``.

    ``w [T, n, h_c]`` fp32, ``grad_out [T, E, D_v]`` contiguous. ``method``: ``"sort"`` (segment
    reduce after sorting by row; writes ``dtype`` directly; rows selected more than
    :data:`SORT_PIECE` times go through a small fp32 staging table) or ``"atomic"`` (fp32 atomics
    into an fp32 copy of the whole table, then cast). No host synchronisation either way.
    """
    t, n = idx.shape
    h_c = w.shape[-1]
    d_v = grad_out.shape[-1]
    e = num_blocks if block is not None else 1
    blk = block if e > 1 else idx
    block_d = _pow2(d_v, 16, 256)
    if method == "atomic":
        acc_dtype = torch.float32
        dv = torch.zeros(num_rows, d_v, device=grad_out.device, dtype=acc_dtype)
        if t > 0:
            _dv_atomic_kernel[(t, triton.cdiv(d_v, block_d))](
                idx, w, blk, grad_out, dv, n, d_v, HC=h_c, DC=d_v // h_c, E=e,
                BLOCK_N=_pow2(n, 1, 16), BLOCK_D=block_d, num_warps=4,
            )
        return dv.to(dtype)
    dev = grad_out.device
    dv = torch.zeros(num_rows, d_v, device=dev, dtype=dtype)
    n_tot = t * n
    if n_tot == 0:
        return dv
    srt, order = torch.sort(idx.reshape(-1), stable=True)
    start = torch.searchsorted(srt, srt, right=False)  # segment bounds of every sorted position
    end = torch.searchsorted(srt, srt, right=True)
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
