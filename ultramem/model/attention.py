"""Causal self-attention with RoPE, grouped-query heads and a preallocated KV cache (math.md §1).

Without a cache, the forward is the training one: causal SDPA over ``[B, S]``. With a
:class:`~ultramem.model.decode_state.KVCache`, each sequence's tokens are written at its own
``positions [B, S]`` and attend to cache positions ``<= position`` (a mask, not ``is_causal``),
so ragged batches, chunked prefill and one-token steps are one code path.

One-token steps whose cache says ``attention="split_kv"`` (or ``"auto"`` at a small batch, the
default on CUDA: see :class:`~ultramem.model.decode_state.KVCache`) take the decode kernels
instead (``ops/decode_attention``): one fused rotary + cache write, then split-KV attention that
reads each sequence's cache only up to its length; ``"rope_sdpa"`` (``"auto"`` at larger
batches): the fused write, then the masked SDPA. Same math; prefill and the CPU keep the SDPA
path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ultramem.layers.packed import pack, project
from ultramem.model.decode_state import KVCache
from ultramem.ops.decode_attention import decode_attention, rope_write
from ultramem.ops.decode_attention.reference import rotate
from ultramem.ops.skinny_linear import skinny_linear
from ultramem.ops.tuning import TUNING


class Rotary(nn.Module):
    """Rotary position embedding tables, ``[max_seq_len, head_dim / 2]`` cos and sin."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.cos.is_meta:
            return
        inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        t = torch.arange(self.max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv).to(self.cos.device)
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    def init_buffers(self) -> None:
        """Recompute the (unsaved) tables, e.g. after loading into a model built on meta."""
        self.reset_parameters()

    def forward(self, x: torch.Tensor, start: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [B, H, S, hd]`` -> rotated (half-split convention), at positions ``start + [0, S)``
        or, if given, per sequence at ``positions [B, S]`` (callers keep them < max_seq_len)."""
        s = x.shape[-2]
        if positions is not None:
            cos = self.cos[positions].unsqueeze(1).to(x.dtype)  # [B, 1, S, hd/2]
            sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        else:
            if start + s > self.max_seq_len:
                raise ValueError(
                    f"sequence position {start + s} exceeds model.max_seq_len={self.max_seq_len}"
                )
            cos = self.cos[start : start + s].to(x.dtype)
            sin = self.sin[start : start + s].to(x.dtype)
        return rotate(x, cos, sin)


class Attention(nn.Module):
    """``[B, S, D] -> [B, S, D]``; ``state`` (decode) holds ``k, v: [B, H_kv, S_past, hd]``."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, rotary: Rotary, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.rotary = rotary
        self.dropout = dropout

    def init_weights(self, std: float, n_layers: int) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=std / math.sqrt(2 * n_layers))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                kv_len: int | None = None) -> torch.Tensor:
        """``x [B, S, D]``; with ``cache``: ``positions [B, S]`` where this call's tokens go and
        ``kv_len`` how many cache positions to read (default all)."""
        b, s, _ = x.shape
        q, k, v = project(self, (self.q_proj, self.k_proj, self.v_proj), x)  # one GEMM when packed
        q = q.view(b, s, self.n_heads, self.head_dim)
        k, v = k.view(b, s, self.n_kv_heads, self.head_dim), v.view(b, s, self.n_kv_heads, self.head_dim)
        mode = self._decode_mode(cache, b) if cache is not None and s == 1 else "sdpa"
        if mode != "sdpa":
            y = self._decode_step(q[:, 0], k[:, 0], v[:, 0], cache, positions, kv_len or cache.k.shape[2],
                                  mode == "split_kv")
            return skinny_linear(y.view(b, 1, -1), self.o_proj.weight)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is None:
            q, k = self.rotary(q, 0), self.rotary(k, 0)
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        else:
            q, k = self.rotary(q, 0, positions), self.rotary(k, 0, positions)
            cache.write(k, v, positions)
            y = self._cached(q, cache, positions, kv_len or cache.k.shape[2])
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))

    def pack_projections(self) -> None:
        """q, k, v weights as views of one buffer (:func:`ultramem.layers.packed.pack`): at one
        token one cuBLAS GEMV of 25 MB in place of three of 8 MB (dense-1.6b)."""
        pack(self, (self.q_proj, self.k_proj, self.v_proj))

    def _decode_mode(self, cache: KVCache, b: int) -> str:
        """How a one-token step of ``b`` sequences reads ``cache`` (by shape only): ``"split_kv"``,
        ``"rope_sdpa"`` or ``"sdpa"`` (``"auto"``: split-KV while ``b * H_kv`` is small, else
        ``"rope_sdpa"``)."""
        if cache.attention != "auto":
            return cache.attention
        return "split_kv" if b * self.n_kv_heads <= TUNING.decode_attention_max_heads else "rope_sdpa"

    def _decode_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                     positions: torch.Tensor, kv_len: int, split_kv: bool) -> torch.Tensor:
        """One token per sequence: ``q [B, H, hd]``, ``k, v [B, H_kv, hd]`` at ``positions [B, 1]``
        -> ``[B, H, hd]``: the fused rotary + cache write, then the split-KV kernel or (``split_kv``
        off) masked SDPA. Under ``torch.compile`` it runs outside the compiled graph
        (:func:`kernels_outside_compile`)."""
        pos = positions[:, 0]
        q = rope_write(q, k, v, self.rotary.cos, self.rotary.sin, pos, cache.k, cache.v, impl="triton")
        if split_kv:
            return decode_attention(q, cache.k, cache.v, pos + 1, kv_len, impl="triton")
        return self._cached(q.unsqueeze(2), cache, positions, kv_len).squeeze(2)

    def _cached(self, q: torch.Tensor, cache: KVCache, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """``q [B, H, S, hd]`` against the cache's first ``kv_len`` positions, key ``j`` visible to
        query ``(b, i)`` iff ``j <= positions[b, i]``. Grouped-query heads fold into the query
        length (``[B, H_kv, G*S, hd]``), so the cache is read once, never repeated per group."""
        b, h, s, d = q.shape
        g = h // self.n_kv_heads
        keys, values = cache.k[:, :, :kv_len], cache.v[:, :, :kv_len]
        mask = torch.arange(kv_len, device=q.device).view(1, 1, 1, kv_len) <= positions.view(b, 1, s, 1)
        if g > 1:
            mask = mask.repeat(1, 1, g, 1)
        y = F.scaled_dot_product_attention(q.reshape(b, self.n_kv_heads, g * s, d), keys.to(q.dtype),
                                           values.to(q.dtype), attn_mask=mask)
        return y.reshape(b, h, s, d)  # SDPA may return a strided layout (fp32 on CUDA, grouped queries)


def kernels_outside_compile() -> None:
    """Keep the decode kernels out of ``torch.compile``'s graphs (one graph break a block): they
    are Triton launches with shape-derived grids, each already one fused kernel. Called by the
    engine before its first compile (as ``bookkeeping_outside_compile``). Idempotent."""
    if not getattr(Attention, "_kernels_outside_compile", False):
        Attention._decode_step = torch.compiler.disable(Attention._decode_step)
        Attention._kernels_outside_compile = True
