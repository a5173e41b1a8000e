"""One-token decode attention over a preallocated cache, in plain PyTorch: the specification the
split-KV kernels are tested against (docs/math.md §1).

Shapes: ``B`` sequences, ``H`` query heads, ``H_kv`` key/value heads (``G = H / H_kv`` query
heads share one, grouped-query attention: query head ``h`` reads key/value head ``h // G``),
``L`` cache positions, ``hd`` head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [..., hd]`` rotated by ``cos, sin [..., hd/2]`` (half-split RoPE convention), in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Rotate one token's ``q [B, H, hd]`` and ``k [B, H_kv, hd]`` at positions ``pos [B]`` (tables
    ``cos, sin [max_seq_len, hd/2]``), store the rotated ``k`` and ``v [B, H_kv, hd]`` in
    ``k_cache, v_cache [B, H_kv, L, hd]`` at ``pos`` (in place; positions ``>= L`` are not stored)
    and return the rotated ``q [B, H, hd]``."""
    c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)  # [B, 1, hd/2]
    q, k = rotate(q, c, s), rotate(k, c, s)
    keep = pos < k_cache.shape[2]
    b = torch.arange(pos.shape[0], device=pos.device)[keep]
    p = pos[keep]
    k_cache[b, :, p] = k[keep].to(k_cache.dtype)
    v_cache[b, :, p] = v[keep].to(v_cache.dtype)
    return q


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     kv_len: int | None = None) -> torch.Tensor:
    """``q [B, H, hd]`` (one query per sequence) against the first ``min(lengths[b], kv_len)``
    positions of ``k_cache, v_cache [B, H_kv, L, hd]`` -> ``[B, H, hd]`` in q's dtype; scale
    ``1 / sqrt(hd)``. Every sequence must see at least one position."""
    b, h, d = q.shape
    h_kv = k_cache.shape[1]
    kv_len = k_cache.shape[2] if kv_len is None else min(kv_len, k_cache.shape[2])
    keys, values = k_cache[:, :, :kv_len].to(q.dtype), v_cache[:, :, :kv_len].to(q.dtype)
    mask = torch.arange(kv_len, device=q.device).view(1, 1, 1, kv_len) < lengths.view(b, 1, 1, 1)
    y = F.scaled_dot_product_attention(q.view(b, h_kv, h // h_kv, d), keys, values, attn_mask=mask,
                                       scale=1.0 / math.sqrt(d))
    return y.reshape(b, h, d)  # SDPA may return a strided layout (fp32 on CUDA, grouped queries)
