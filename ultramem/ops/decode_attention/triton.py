"""Triton kernels of one-token decode attention: split-KV ("flash-decoding") attention and the
fused rotary + cache write before it.

Why split: with one query per sequence, attention is a pure read of the cache, and a kernel that
gives each (sequence, head) one program has ``B * H`` programs (16 at batch 1 for dense-1.6b, on
132 SMs), each streaming its whole ``L x hd`` keys and values alone. :func:`_split_kernel` cuts
the cache positions into ``S`` chunks, so ``B * H_kv * S`` programs read it in parallel; each
keeps an online softmax over its chunk (running max ``m``, sum ``denom``, accumulator) for the ``G``
query heads that share its key/value head, and writes the chunk's normalised output and
log-sum-exp. :func:`_combine_kernel` merges the chunks: ``o = sum_s exp(lse_s - max) o_s / sum_s
exp(lse_s - max)``. A program stops at its sequence's length (read on the device), so the
positions past it are never read, and nothing here syncs with the host: the grid depends only
on shapes, so both kernels replay in a CUDA graph.

Products are elementwise fp32 ``[G, BLOCK_N, hd]`` tiles reduced over ``hd`` (not ``tl.dot``):
one query row per head leaves tensor cores nothing to do, and fp32 keeps the interpreter (CPU
tests) exact. :func:`_rope_write_kernel` rotates the token's query and key heads (fp32) and
stores key and value in the cache at the sequence's position: one kernel for what the PyTorch
path does in about a dozen (gathers of the tables, halves, products, concatenations, scatters).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ultramem.ops.tuning import TUNING

TARGET_PROGRAMS = 1024  # split until B * H_kv * S reaches this (several programs per SM)


def plan(b: int, h_kv: int, g: int, d: int, kv_len: int) -> tuple[int, int, int, int]:
    """``(BLOCK_N, num_warps, splits, chunk)`` for this shape: the positions per tile, warps,
    chunks and positions per chunk (a multiple of BLOCK_N). ``TUNING.decode_attention_tile``
    (``(BLOCK_N, num_warps, target_programs)``) overrides the defaults."""
    tile = TUNING.decode_attention_tile or (0, 2, TARGET_PROGRAMS)
    bd, bg = triton.next_power_of_2(d), triton.next_power_of_2(g)
    # ~4 K fp32 products a tile on 2 warps: at hd 128, 32 positions (measured on H200 against 16-64
    # positions on 2-8 warps: 12.0 us vs 20.1 for (64, 4) at B=1, 331 vs 685 at B=64; decode-h200-e.json)
    block_n = tile[0] or max(16, min(32, 4096 // (bg * bd)))
    block_n = min(block_n, max(16, triton.next_power_of_2(kv_len)))
    tiles = triton.cdiv(kv_len, block_n)
    splits = max(1, min(tiles, triton.cdiv(tile[2], b * h_kv)))
    chunk = triton.cdiv(tiles, splits) * block_n
    return block_n, tile[1], triton.cdiv(kv_len, chunk), chunk


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, o_ptr, lse_ptr, H_KV, KV_LEN, CHUNK, scale,
                  sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                  G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Chunk ``program_id(1)`` of sequence ``b``, key/value head ``hk``: its ``G`` query heads'
    normalised output ``o [B, H, S, D]`` (fp32) and log-sum-exp ``lse [B, H, S]``."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    b = bh // H_KV
    hk = bh % H_KV
    length = tl.minimum(tl.load(len_ptr + b).to(tl.int32), KV_LEN)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, length)
    rg = tl.arange(0, BLOCK_G)
    rd = tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    gmask = rg < G
    dmask = rd < D
    heads = hk * G + rg
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + heads[:, None] * sq_h + rd[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * scale
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    k_base = k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + rn
        nmask = pos < end
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_base + pos[:, None].to(tl.int64) * sk_l + rd[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + pos[:, None].to(tl.int64) * sv_l + rd[None, :], mask=kv_mask, other=0.0)
        s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # [BLOCK_G, BLOCK_N]
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m = m_new
    seen = denom > 0  # an empty chunk (past the length): lse -inf, output 0
    lse = tl.where(seen, m + tl.log(tl.where(seen, denom, 1.0)), float("-inf"))
    out = acc / tl.where(seen, denom, 1.0)[:, None]
    row = (b * (H_KV * G) + heads).to(tl.int64) * n_split + split
    tl.store(o_ptr + row[:, None] * BLOCK_D + rd[None, :], out, mask=gmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + row, lse, mask=gmask)


@triton.jit
def _combine_kernel(o_ptr, lse_ptr, y_ptr, H, S, sy_b, sy_h, D: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """``y[b, h] = sum_s w_s o[b, h, s] / sum_s w_s`` with ``w_s = exp(lse_s - max_s lse_s)``."""
    bh = tl.program_id(0)
    rs = tl.arange(0, BLOCK_S)
    rd = tl.arange(0, BLOCK_D)
    smask = rs < S
    lse = tl.load(lse_ptr + bh.to(tl.int64) * S + rs, mask=smask, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, axis=0))
    w = tl.where(smask, w, 0.0)
    o = tl.load(o_ptr + (bh.to(tl.int64) * S + rs)[:, None] * BLOCK_D + rd[None, :],
                mask=smask[:, None] & (rd[None, :] < D), other=0.0)
    y = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    b = bh // H
    h = bh % H
    tl.store(y_ptr + b.to(tl.int64) * sy_b + h * sy_h + rd, y.to(y_ptr.dtype.element_ty), mask=rd < D)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     kv_len: int) -> torch.Tensor:
    """``q [B, H, hd]`` (unit stride in hd), caches ``[B, H_kv, L, hd]`` (unit stride in hd),
    ``lengths [B]`` -> ``[B, H, hd]`` in q's dtype (see reference.decode_attention)."""
    b, h, d = q.shape
    h_kv = k_cache.shape[1]
    g = h // h_kv
    block_n, warps, splits, chunk = plan(b, h_kv, g, d, kv_len)
    bd = triton.next_power_of_2(d)
    part = torch.empty(b * h * splits, bd, device=q.device, dtype=torch.float32)
    lse = torch.empty(b * h * splits, device=q.device, dtype=torch.float32)
    _split_kernel[(b * h_kv, splits)](
        q, k_cache, v_cache, lengths, part, lse, h_kv, kv_len, chunk, 1.0 / math.sqrt(d),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        G=g, D=d, BLOCK_G=triton.next_power_of_2(g), BLOCK_N=block_n, BLOCK_D=bd, num_warps=warps)
    y = torch.empty(b, h, d, device=q.device, dtype=q.dtype)
    _combine_kernel[(b * h,)](part, lse, y, h, splits, y.stride(0), y.stride(1), D=d,
                              BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=bd, num_warps=1 if bd <= 64 else 2)
    return y


@triton.jit
def _rope_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, qo_ptr,
                       H, H_KV, L, MAX_POS, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, sc_h, sc_l,
                       svc_b, svc_h, svc_l, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Token ``b``, head ``h``: rotated query into ``qo [B, H, 2*HALF]``; for ``h < H_kv`` also
    the rotated key and the value into the caches at ``pos[b]`` (skipped when ``pos >= L``)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.arange(0, BLOCK_H)
    rmask = r < HALF
    p = tl.load(pos_ptr + b)
    p_tab = tl.minimum(p, MAX_POS - 1)  # a position past the tables is not stored; never read past them
    cos = tl.load(cos_ptr + p_tab * HALF + r, mask=rmask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + p_tab * HALF + r, mask=rmask, other=0.0).to(tl.float32)
    qb = q_ptr + b.to(tl.int64) * sq_b + h * sq_h
    q1 = tl.load(qb + r, mask=rmask, other=0.0).to(tl.float32)
    q2 = tl.load(qb + HALF + r, mask=rmask, other=0.0).to(tl.float32)
    ob = qo_ptr + (b.to(tl.int64) * H + h) * (2 * HALF)
    tl.store(ob + r, (q1 * cos - q2 * sin).to(qo_ptr.dtype.element_ty), mask=rmask)
    tl.store(ob + HALF + r, (q1 * sin + q2 * cos).to(qo_ptr.dtype.element_ty), mask=rmask)
    if (h < H_KV) & (p < L):
        kb = k_ptr + b.to(tl.int64) * sk_b + h * sk_h
        k1 = tl.load(kb + r, mask=rmask, other=0.0).to(tl.float32)
        k2 = tl.load(kb + HALF + r, mask=rmask, other=0.0).to(tl.float32)
        cb = kc_ptr + b.to(tl.int64) * sc_b + h * sc_h + p.to(tl.int64) * sc_l
        tl.store(cb + r, (k1 * cos - k2 * sin).to(kc_ptr.dtype.element_ty), mask=rmask)
        tl.store(cb + HALF + r, (k1 * sin + k2 * cos).to(kc_ptr.dtype.element_ty), mask=rmask)
        vb = v_ptr + b.to(tl.int64) * sv_b + h * sv_h
        vcb = vc_ptr + b.to(tl.int64) * svc_b + h * svc_h + p.to(tl.int64) * svc_l
        v1 = tl.load(vb + r, mask=rmask, other=0.0)
        v2 = tl.load(vb + HALF + r, mask=rmask, other=0.0)
        tl.store(vcb + r, v1.to(vc_ptr.dtype.element_ty), mask=rmask)
        tl.store(vcb + HALF + r, v2.to(vc_ptr.dtype.element_ty), mask=rmask)


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """See reference.rope_write; ``q [B, H, hd]``, ``k, v [B, H_kv, hd]`` with unit stride in hd,
    ``cos, sin`` contiguous, caches with unit stride in hd."""
    b, h, d = q.shape
    h_kv = k.shape[1]
    half = d // 2
    qo = torch.empty(b, h, d, device=q.device, dtype=q.dtype)
    _rope_write_kernel[(b, h)](
        q, k, v, cos, sin, pos, k_cache, v_cache, qo, h, h_kv, k_cache.shape[2], cos.shape[0],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HALF=half, BLOCK_H=triton.next_power_of_2(half), num_warps=1)
    return qo
