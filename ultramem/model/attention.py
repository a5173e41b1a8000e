"""Causal self-attention with RoPE, grouped-query heads and an optional KV cache (SPEC §1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """``x: [B, H, S, hd]`` -> rotated (half-split convention)."""
        s = x.shape[-2]
        if start + s > self.max_seq_len:
            raise ValueError(
                f"sequence position {start + s} exceeds model.max_seq_len={self.max_seq_len}"
            )
        cos = self.cos[start : start + s].to(x.dtype)
        sin = self.sin[start : start + s].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


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

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        start = 0 if state is None else state.get("pos", 0)
        q, k = self.rotary(q, start), self.rotary(k, start)
        if state is not None:
            if "k" in state:
                k = torch.cat([state["k"], k], dim=2)
                v = torch.cat([state["v"], v], dim=2)
            state["k"], state["v"], state["pos"] = k, v, start + s
        causal = state is None or s > 1
        if state is not None and s > 1 and start > 0:
            raise NotImplementedError("chunked prefill after a prefix is not supported; decode one token at a time")
        y = F.scaled_dot_product_attention(
            q, k, v,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))
