"""Triton kernel for decode-size key scores: query norm + per-rank key dot products, one launch.

Semantics: :mod:`ultramem.ops.key_scores.reference`. Shapes: ``q [T, Q, 2, rq, K]``,
``keys [2, H, N, r, K]`` (contiguous, key-normed) -> ``s_row, s_col`` ``[Q, T, G, N, r]``
(head ``h = q * G + g`` uses query group ``q``).

The op is one read of the key table (25.7 MB at the 1.6B-x12 size) for at most
:data:`MAX_T` tokens, so :func:`_key_scores_kernel` is built around that read. The table is
seen as ``2 * H * N * r`` rows of K; a program owns ``BLOCK_M`` consecutive rows of one
(head, side) -- with one query per rank (``rq = r > 1``), of one (head, side, rank): rows
``n * r + j`` -- so each key byte is read by exactly one program, grid
``(cdiv(rows per group, BLOCK_M), groups)``. Each program loads the queries its rows need (its
head's group, its side, its rank: recomputed per program, ``T x K`` elements from L2),
normalises them in fp32 (LayerNorm / RMSNorm with the affine, as ``F.layer_norm`` /
``F.rms_norm``), rounds them to the key dtype as the reference's norm output is, and takes
the dot products with fp32 accumulation; the scores go straight into the ``[2, Q, T, G, N, r]``
output (``s_row, s_col`` are its halves). Two paths, by the tile's ``TB`` (tokens a step):

- ``TB < 16`` (one or two tokens), :func:`_rowsum_scores`: the whole key tile
  ``[BLOCK_M, KP]`` (``KP`` = K rounded up to a power of two, masked) is requested at once,
  then per token a multiply + row sum (a GEMV; ``tl.dot`` needs 16 rows).
- ``TB >= 16``, :func:`_dot_scores`: ``tl.dot`` of ``[BLOCK_M, BK]`` key chunks with the
  ``[TB, BK]`` query chunks (all tokens padded to one step), loads pipelined by Triton; the
  norm statistics accumulate over the same chunks and the norm is applied after the dot
  (see its docstring), so queries and keys are each read once.

``PDL`` (compile time; host switch :data:`USE_PDL`, default off): programmatic dependent
launch (``launch_pdl=True``). The row-sum path requests its key tile (and the norm affine) *before* ``gdc_wait()`` and loads the queries after it; the dot path, whose key
loads are Triton's pipelined loop, prefetches its key rows into L2 before the wait. Either way
the key read overlaps the tail of the preceding kernel (the query projection). Valid only when
the keys and norm parameters were not written by the kernel just before in the
stream (the layer's key cache is filled once, long before decoding). Off under the
interpreter (no grid dependencies there).

Tiles: :func:`_blocks` by T (override: env ``ULTRAMEM_KS_BLOCKS="BLOCK_M,TB,num_warps[,BK]"``).
Under the CPU interpreter (``TRITON_INTERPRET=1``, the tests) ``tl.dot`` is only right in fp32
and a cast to bf16 truncates, so there the operands are fp32 holding the key-dtype rounding
(round to nearest even on the bits): the numbers the GPU's bf16 ``tl.dot`` sees.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_T = 64  # decode batch sizes: the dispatcher takes the reference above this
# Off by default: on an H200 (2026-11-22, benchmarks/key_scores_bench.py, key-scores-h200.json)
# the kernel took 10.8 / 11.7 / 11.6 / 17.2 us at T 1 / 4 / 16 / 64 (best tiles) against
# ~8.5 us for the reference's LayerNorm + one batched cuBLAS matmul over both sides; kept,
# tested, for other shapes and GPUs (set True to use it).
USE_KERNEL = False
MAX_K = 1024  # the row-sum path holds [BLOCK_M, next_pow2(K)] tiles; wider keys: the reference
USE_PDL = False  # launch with programmatic dependent launch (see the module docstring)
NORM_CODES = {"none": 0, "layernorm": 1, "rmsnorm": 2}
# "BLOCK_M,TB,num_warps[,BK]" override of _blocks (tuning; benchmarks/key_scores_bench.py):
# powers of two, TB 1-8 (multiply + row sum) or 16-64 (tl.dot, BLOCK_M >= 16)
BLOCKS = os.environ.get("ULTRAMEM_KS_BLOCKS")
ROWSUM_TILE = 8192  # key-tile elements (BLOCK_M * KP) of a 4-warp multiply + row-sum program


class KsCfg(NamedTuple):
    """Tile of :func:`_key_scores_kernel`."""

    bm: int  # BLOCK_M: key rows per program
    tb: int  # TB: tokens per step (1: multiply + row sum; >= 16: tl.dot)
    w: int  # num_warps
    bk: int = 64  # K chunk of the tl.dot path


@triton.jit
def _operand(x, DT: tl.constexpr, INTERP: tl.constexpr):
    """fp32 ``x`` rounded to the dot operand dtype ``DT``. On the GPU: ``x.to(DT)``. In the
    interpreter: fp32 holding that rounding (its fp32 -> bf16 cast truncates; round to nearest
    even on the bits instead)."""
    if INTERP:
        if DT == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            return b.to(tl.float32, bitcast=True)
        else:
            return x.to(DT).to(tl.float32)
    else:
        return x.to(DT)


@triton.jit
def _prefetch_l2(ptrs):
    """``prefetch.global.L2`` of each pointer (sm_90; the PDL path of the dot kernel)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _norm_rows(x, mask_k, w, b, eps, K: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
               HAS_B: tl.constexpr):
    """LayerNorm (biased variance, as ``F.layer_norm``) / RMSNorm / none of the rows of
    ``x [TB, KP]`` fp32 over the first K columns, then the affine (0 in the padded columns)."""
    if NORM == 1:
        mean = tl.sum(x, axis=1) / K
        x = tl.where(mask_k[None, :], x - mean[:, None], 0.0)
        x = x * tl.rsqrt(tl.sum(x * x, axis=1) / K + eps)[:, None]
    elif NORM == 2:
        x = x * tl.rsqrt(tl.sum(x * x, axis=1) / K + eps)[:, None]
    if HAS_W:
        x = x * w[None, :]
    if HAS_B:
        x = x + b[None, :]
    return x


@triton.jit
def _rowsum_scores(q_base, k_rows, w_ptr, b_ptr, o_base, mask_m, T, stride_qt, stride_ot, eps,
                   K: tl.constexpr, KP: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr, TB: tl.constexpr, INTERP: tl.constexpr,
                   PDL: tl.constexpr):
    """Few tokens: the whole key tile ``[BLOCK_M, KP]`` requested at once (before the PDL
    wait), then per step of TB tokens the normalised queries ``[TB, KP]`` and a multiply + row
    sum in fp32."""
    offs_k = tl.arange(0, KP)
    mask_k = offs_k < K
    kt = tl.load(k_rows[:, None] + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                 other=0.0)
    w = tl.load(w_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32) if HAS_W else 0.0
    b = tl.load(b_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32) if HAS_B else 0.0
    if PDL:  # the queries are the previous kernel's output: wait for it only now
        tl.extra.cuda.gdc_wait()
    kf = kt.to(tl.float32)
    for t0 in range(0, T, TB):
        offs_t = t0 + tl.arange(0, TB)
        mask_t = offs_t < T
        x = tl.load(q_base + offs_t[:, None] * stride_qt + offs_k[None, :],
                    mask=mask_t[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        x = _norm_rows(x, mask_k, w, b, eps, K, NORM, HAS_W, HAS_B)
        qo = _operand(x, kt.dtype, INTERP).to(tl.float32)  # rounded as the reference's q
        s = tl.sum(kf[:, None, :] * qo[None, :, :], axis=2)  # [BLOCK_M, TB]
        s = _operand(s, o_base.dtype.element_ty, INTERP)
        tl.store(o_base[:, None] + offs_t[None, :] * stride_ot, s.to(o_base.dtype.element_ty),
                 mask=mask_m[:, None] & mask_t[None, :])


@triton.jit
def _dot_scores(q_base, k_ptr, k_rows, w_ptr, b_ptr, o_base, mask_m, T, stride_qt, stride_ot,
                eps, K: tl.constexpr, KP: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
                HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, TB: tl.constexpr,
                BK: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr):
    """TB >= 16 tokens a step, ``tl.dot`` over K in chunks of BK (pipelined loads). The norm is
    applied after the dot, so queries and keys are each read once per step:

    ``S = rstd * (<(x - m0) w, k> - (mean - m0) <w, k>) + <b, k>`` (LayerNorm),
    ``S = rstd * <x w, k>`` (RMSNorm), with the statistics accumulated over the same chunks;
    ``m0`` (the mean of the first chunk) keeps the dot operand centred -- it is rounded to the
    key dtype like the reference's normalised query, whose magnitude it has -- and the
    one-pass variance free of cancellation. ``<w, k>`` and ``<b, k>`` are fp32 row sums."""
    DT: tl.constexpr = k_rows.dtype.element_ty
    K0: tl.constexpr = K if K < BK else BK
    if PDL:  # request this program's key rows into L2 while the previous kernel finishes
        LINE: tl.constexpr = 128 // DT.primitive_bitwidth * 8
        cols = tl.minimum(tl.arange(0, KP // LINE if KP > LINE else 1) * LINE, K - 1)
        _prefetch_l2(tl.where(mask_m[:, None], k_rows[:, None] + cols[None, :], k_ptr))
        tl.extra.cuda.gdc_wait()
    for t0 in range(0, T, TB):
        offs_t = t0 + tl.arange(0, TB)
        mask_t = offs_t < T
        q_rows = q_base + offs_t * stride_qt
        if NORM == 1:  # the shift m0: mean of the first chunk
            offs_c = tl.arange(0, BK)
            x0 = tl.load(q_rows[:, None] + offs_c[None, :],
                         mask=mask_t[:, None] & (offs_c < K0)[None, :], other=0.0)
            m0 = tl.sum(x0.to(tl.float32), axis=1) / K0
        acc = tl.zeros([BLOCK_M, TB], dtype=tl.float32)
        kw = tl.zeros([BLOCK_M], dtype=tl.float32)  # <w, k> (LayerNorm)
        kb = tl.zeros([BLOCK_M], dtype=tl.float32)  # <b, k>
        s1 = tl.zeros([TB], dtype=tl.float32)  # sum of (x - m0)
        s2 = tl.zeros([TB], dtype=tl.float32)  # sum of (x - m0)^2, or of x^2 (RMSNorm)
        for k0 in range(0, K, BK):
            offs_c = k0 + tl.arange(0, BK)
            mask_c = offs_c < K
            kc = tl.load(k_rows[:, None] + offs_c[None, :],
                         mask=mask_m[:, None] & mask_c[None, :], other=0.0)  # [BLOCK_M, BK]
            x = tl.load(q_rows[:, None] + offs_c[None, :],
                        mask=mask_t[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            if NORM == 1:
                x = tl.where(mask_c[None, :], x - m0[:, None], 0.0)
                s1 += tl.sum(x, axis=1)
            if NORM != 0:
                s2 += tl.sum(x * x, axis=1)
            if HAS_W:
                wc = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                x = x * wc[None, :]
            qo = _operand(x, DT, INTERP)
            if INTERP:  # the interpreter's dot is only right in fp32 (same values)
                acc = tl.dot(kc.to(tl.float32), tl.trans(qo), acc)
            elif DT == tl.float32:
                acc = tl.dot(kc, tl.trans(qo), acc, input_precision="ieee")
            else:
                acc = tl.dot(kc, tl.trans(qo), acc)
            if NORM == 1:
                kf = kc.to(tl.float32)
                kw += tl.sum(kf * wc[None, :], axis=1) if HAS_W else tl.sum(kf, axis=1)
                if HAS_B:
                    bc = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                    kb += tl.sum(kf * bc[None, :], axis=1)
        if NORM == 1:
            d = s1 / K  # mean - m0
            rstd = tl.rsqrt(s2 / K - d * d + eps)
            s = rstd[None, :] * (acc - kw[:, None] * d[None, :]) + kb[:, None]
        elif NORM == 2:
            s = acc * tl.rsqrt(s2 / K + eps)[None, :]
        else:
            s = acc
        s = _operand(s, o_base.dtype.element_ty, INTERP)
        tl.store(o_base[:, None] + offs_t[None, :] * stride_ot, s.to(o_base.dtype.element_ty),
                 mask=mask_m[:, None] & mask_t[None, :])


@triton.jit
def _key_scores_kernel(
    q_ptr, k_ptr, G, H, w_ptr, b_ptr, out_ptr,
    T, M, NR, stride_ot, stride_os, stride_oq, stride_qt, stride_qg, stride_qs, stride_qj, eps,
    K: tl.constexpr, KP: tl.constexpr, R: tl.constexpr, RQ: tl.constexpr, NORM: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, TB: tl.constexpr,
    BK: tl.constexpr, INTERP: tl.constexpr, PDL: tl.constexpr,
):
    """Grid ``(cdiv(M, BLOCK_M), 2 H * (R if RQ > 1 else 1))``. ``M`` rows per group:
    ``N * r`` (RQ = 1, rows contiguous) or ``N`` (RQ = R, rank j's rows, stride R). Head h
    reads query group ``h // G`` and writes ``out[side, h // G, :, h % G]``."""
    STEP: tl.constexpr = R if RQ > 1 else 1  # row stride of a group, in rows
    grp = tl.program_id(1)
    if RQ > 1:
        j = grp % R
        hs = grp // R
    else:
        j = 0
        hs = grp
    h = hs // 2
    side = hs % 2
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # rows of this group within the [2, H, N*r] row space
    k_rows = k_ptr + ((side * H + h) * NR + j + offs_m * STEP).to(tl.int64) * K  # [BLOCK_M]
    g = h // G  # query group of this head
    o_base = out_ptr + side * stride_os + g * stride_oq + (h - g * G) * NR + j + offs_m * STEP
    q_base = q_ptr + g * stride_qg + side * stride_qs + (j if RQ > 1 else 0) * stride_qj
    if TB >= 16:
        _dot_scores(q_base, k_ptr, k_rows, w_ptr, b_ptr, o_base, mask_m, T, stride_qt, stride_ot,
                    eps, K, KP, NORM, HAS_W, HAS_B, BLOCK_M, TB, BK, INTERP, PDL)
    else:
        _rowsum_scores(q_base, k_rows, w_ptr, b_ptr, o_base, mask_m, T, stride_qt, stride_ot,
                       eps, K, KP, NORM, HAS_W, HAS_B, TB, INTERP, PDL)


def _pow2(x: int, lo: int = 1, hi: int | None = None) -> int:
    p = max(lo, triton.next_power_of_2(max(int(x), 1)))
    return min(p, hi) if hi is not None else p


def _blocks(t: int, k: int, fp32: bool = False) -> KsCfg:
    """Tile by the token count (sized for the 1.6B-x12 decode shape, K 448 and 4 x 7168 rows,
    by the sm_90 compile check: no spills; timings: benchmarks/key_scores_bench.py).

    One or two tokens: a multiply + row sum over the whole key tile of ``ROWSUM_TILE``
    elements, at least 16 rows (16 at K 448: 1792 programs of 14 KB, 64 registers, ~8 resident
    per SM with all their loads in flight; 8 warps for wider keys). More: ``tl.dot`` over all
    tokens in one step (16-64, padded), 64-row tiles (448 programs, wgmma on sm_90), K in
    chunks of 32 (80-95 registers; chunks of 64 take 122-180); 8 warps for 64 tokens. fp32
    (an FMA dot, no tensor cores): 32 rows, K in chunks of 16 (wider chunks spill)."""
    if BLOCKS:
        return KsCfg(*(int(x) for x in BLOCKS.split(",")))
    if t <= 2:
        bm = _pow2(ROWSUM_TILE // _pow2(k, 16), 16, 128)
        return KsCfg(bm, 1, 4 if bm * _pow2(k, 16) <= ROWSUM_TILE else 8)
    tb = _pow2(t, 16, MAX_T)
    return KsCfg(32 if fp32 else 64, tb, 8 if tb > 32 else 4, 16 if fp32 else 32)


def supported(q: torch.Tensor, keys: torch.Tensor, norm: str) -> bool:
    """The shapes and dtypes the kernel takes (the dispatcher checks before launching)."""
    t, _, _, rq, k = q.shape
    r = keys.shape[3]
    return (0 < t <= MAX_T and k <= MAX_K and norm in NORM_CODES and rq in (1, r)
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and keys.dtype == q.dtype and keys.shape[1] > 0)


def _launch(q, keys, norm, weight, bias, eps, out):
    """``(grid, args, kwargs)`` of :func:`_key_scores_kernel` (also for compile checks on meta
    tensors, benchmarks/key_scores_bench.py)."""
    t, _, _, rq, k = q.shape
    _, h, n, r, _ = keys.shape
    cfg = _blocks(t, k, q.dtype == torch.float32)
    per_rank = rq > 1
    m = n if per_rank else n * r
    groups = 2 * h * (r if per_rank else 1)
    interp = q.device.type == "cpu"
    grid = (triton.cdiv(m, cfg.bm), groups)
    g = h // q.shape[1]  # heads per query group
    args = (q, keys, g, h, weight if weight is not None else q,
            bias if bias is not None else q, out, t, m, n * r, g * n * r, t * h * n * r,
            t * g * n * r, q.stride(0), q.stride(1), q.stride(2), q.stride(3), eps)
    kwargs = dict(K=k, KP=_pow2(k, 16), R=r, RQ=rq, NORM=NORM_CODES[norm],
                  HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_M=cfg.bm, TB=cfg.tb,
                  BK=_pow2(k, 16, cfg.bk), INTERP=interp, PDL=USE_PDL and not interp,
                  num_warps=cfg.w)
    if USE_PDL and not interp:
        kwargs["launch_pdl"] = True
    return grid, args, kwargs


def key_scores(q, keys, norm, weight, bias, eps):
    """``(s_row, s_col)``, each ``[Q, T, G, N, r]`` in the dtype of ``q`` (fp32 accumulation);
    ``eps`` a number (resolved by the dispatcher)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    keys = keys.contiguous()
    t, n_q = q.shape[:2]
    _, h, n, r, _ = keys.shape
    out = torch.empty(2, n_q, t, h // n_q, n, r, device=q.device, dtype=q.dtype)
    if out.numel():
        grid, args, kwargs = _launch(q, keys, norm, weight, bias, float(eps), out)
        _key_scores_kernel[grid](*args, **kwargs)
    return out[0], out[1]
