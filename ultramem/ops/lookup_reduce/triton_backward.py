"""Triton backward kernels of lookup-reduce (docs/math.md §7): score and value gradients.

- :func:`_bwd_scores_kernel`, grid ``(T, n / BLOCK_N)``: per selection and core the dot of the
  value slice with the output gradient of its block; gives ``d scores``, the gradient of the
  V2 pre-value dot (``ddot``) and ``a`` (the activation) for the value gradient.
- The value gradient ``dV[idx[t,j], c-slice] += w[t,j,c] * dO[t, block, c-slice]`` is a dense
  ``[P, D_v]`` tensor written once in row order (:func:`scatter_rows`): after an int32 sort of
  the row ids, :func:`_dv_prep_kernel` (segment bounds, per-position ``grad_out`` row and
  weights), :func:`_dv_hot_kernel` (fp32 sums of fixed chunks of the rows selected more than
  ``DENSE_PIECE`` times), :func:`_dv_dense_kernel` (every table row, zeros included: no
  separate zero-fill) and :func:`_dv_combine_kernel` (hot rows: first piece + chunk sums). No
  atomics: bitwise deterministic, each row summed in ``(t, j)`` order.

The pre-value gradients reuse these: ``d pre_query`` is a lookup-reduce of the pre-value table
weighted by ``ddot`` (the forward kernel), ``d pre_values`` the value-gradient scatter of
``pre_query`` weighted by ``ddot``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ultramem.ops.lookup_reduce.triton_forward import ACT_CODES, act, pow2, pre_dot
from ultramem.ops.tuning import TUNING


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
        dot = pre_dot(u_ptr, q_ptr, rows, mask_n, t, D_P, stride_u, stride_q,
                       BLOCK_N, BLOCK_P)
        a = act(dot, ACT)
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


DENSE_PIECE = 32  # occurrences a row sums serially in the dense kernel; hotter rows go by chunks
DENSE_PREP_BLOCK = 1024  # sorted positions per program of the preprocessing kernel
DENSE_HOT_GRID = 1024  # programs of the persistent hot-row kernels (x column tiles)
DENSE_CARRY_BLOCK = 16  # carry chunks a hot row adds per step

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
    block_n = pow2(n, 1, 16)
    _bwd_scores_kernel[(t, triton.cdiv(n, block_n))](
        values, idx, scores, block if e > 1 else idx, pre_values if has_pre else values,
        pre_query if has_pre else values, grad_out, ds, a if has_pre else ds,
        ddot if has_pre else ds,
        n, d_v, d_p, values.stride(0), pre_values.stride(0) if has_pre else 0,
        pre_query.stride(0) if has_pre else 0,
        HC=h_c, DC=d_v // h_c, E=e, HAS_PRE=has_pre, ACT=ACT_CODES[activation],
        BLOCK_N=block_n, BLOCK_D=pow2(d_v // h_c, 16, 128),
        BLOCK_P=pow2(d_p, 16, 128), num_warps=4,
    )
    return ds, a, ddot


def _dense_blocks(d_v: int) -> tuple[int, int, int, int]:
    """``(BLOCK_R, BLOCK_D, num_warps, UNROLL)`` of :func:`_dv_dense_kernel`."""
    if TUNING.lookup_dense_tile:
        block_r, block_d, warps, unroll = TUNING.lookup_dense_tile
        return block_r, pow2(d_v, 16, block_d), warps, unroll
    return 16, pow2(d_v, 16, 256), 4, 2


def _check_int32(n_tot: int, num_rows: int, go_rows: int) -> None:
    """The value gradient keeps sorted positions, row ids and grad_out rows in int32."""
    if max(n_tot, num_rows, go_rows) >= 2**31:
        raise ValueError(f"scatter_rows: T*n = {n_tot}, P = {num_rows} and T*E = {go_rows} "
                         "must be < 2^31")


def dense_prep(num_rows, idx, w, block, num_blocks):
    """Preprocessing of :func:`scatter_rows`, no host synchronisation: ``(srt, bounds, gsrc, wsrt)``.

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


def scatter_rows(num_rows, idx, w, block, num_blocks, grad_out, dtype):
    """``dV [num_rows, D_v]`` in ``dtype`` with ``dV[idx[t,j], c-slice] += w[t,j,c] *
    grad_out[t, block, c-slice]``; ``w [T, n, h_c]`` fp32, ``grad_out [T, E, D_v]`` contiguous.
    Every row written once in row order (zeros included); rows selected more than
    :data:`DENSE_PIECE` times summed by chunks. Four launches after the sort, no host sync."""
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
    block_h = pow2(d_v, 16, 256)
    grid_dh = triton.cdiv(d_v, block_h)
    g = max(1, min(n_chunk, DENSE_HOT_GRID // grid_dh))
    hot_kw = dict(HC=h_c, DC=dc, PIECE=piece, ONE_CORE=h_c == 1 or dc % block_h == 0,
                  CPB=pow2(triton.cdiv(n_chunk, g)), SUB=pow2(piece, 1, 16), BLOCK_D=block_h,
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


