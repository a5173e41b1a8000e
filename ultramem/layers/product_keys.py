"""Product-key retrieval module shared by PKM and Memory+ (math.md §2).

``q = norm(W_q x)`` split per head into ``q_row, q_col in R^K``; ``s_row = K_row q_row``,
``s_col = K_col q_col`` over N keys per side; phase-1 top-k per side, k x k grid of sums,
top-m. Address ``a*N + b`` indexes a table of N^2 values. The top-k work is the
``ultramem.ops.retrieval.product_key_topk`` op.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ultramem.errors import ConfigError
from ultramem.layers.norm import make_norm
from ultramem.layers.registry import MemoryLayerConfig, ShapeContext
from ultramem.ops.retrieval import product_key_topk

QUERY_NORMS = ("batchnorm", "layernorm", "none")


def check_product_keys(cfg: ProductKeyMemoryConfig, where: str) -> None:
    """Shared validation of product-key fields (n_keys, key_dim, heads, topk, k, query_norm)."""

    for name in ("n_keys", "key_dim", "heads", "topk"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{where}.{name}={getattr(cfg, name)} must be a positive integer")
    if getattr(cfg, "value_dim", 0) < 0:
        raise ConfigError(f"{where}.value_dim={cfg.value_dim}; allowed: 0 (= d_model) or a positive size")
    k = cfg.k or cfg.topk
    if k > cfg.n_keys:
        raise ConfigError(f"{where}.k={k} exceeds {where}.n_keys={cfg.n_keys}; allowed: k <= n_keys")
    if cfg.topk > k * k:
        raise ConfigError(
            f"{where}.topk={cfg.topk} exceeds k^2={k * k} candidates (k={k}); raise {where}.k "
            f"or lower {where}.topk"
        )
    if cfg.query_norm not in QUERY_NORMS:
        raise ConfigError(f"{where}.query_norm={cfg.query_norm!r}; allowed: {', '.join(QUERY_NORMS)}")


class ProductKeyMemoryConfig(MemoryLayerConfig):
    """Methods shared by the PKM and Memory+ configs (fields: n_keys, key_dim, heads, topk, k,
    query_norm, value_dim)."""

    def validate(self, shape: ShapeContext, where: str) -> None:
        check_product_keys(self, where)

    def _dv(self, shape: ShapeContext) -> int:
        return self.value_dim or shape.d_model


def retrieval_params(d_model: int, heads: int, n_keys: int, key_dim: int, query_norm: str) -> int:
    """Parameters of :class:`ProductKeyRetrieval` (query projection, its norm, keys)."""
    q = d_model * heads * 2 * key_dim
    norm = {"batchnorm": 2 * heads * 2 * key_dim, "layernorm": 2 * key_dim, "none": 0}[query_norm]
    return q + norm + heads * 2 * n_keys * key_dim


def retrieval_macs(d_model: int, heads: int, n_keys: int, key_dim: int) -> int:
    """Multiply-accumulates per token: query projection plus row and column key scores."""
    return d_model * heads * 2 * key_dim + heads * 2 * n_keys * key_dim


class ProductKeyRetrieval(nn.Module):
    """``x [T, D] -> (scores [T, H, m], addr [T, H, m])``."""

    def __init__(
        self, d_model: int, heads: int, n_keys: int, key_dim: int, m: int, k: int,
        query_norm: str, impl: str = "auto",
    ) -> None:
        super().__init__()
        self.heads, self.n_keys, self.key_dim, self.m, self.k, self.impl = heads, n_keys, key_dim, m, k, impl
        self.query_proj = nn.Linear(d_model, heads * 2 * key_dim, bias=False)
        # Lample et al.: BatchNorm over the whole query projection; LayerNorm over each K-dim query
        self.query_norm = make_norm(query_norm, heads * 2 * key_dim if query_norm == "batchnorm" else key_dim)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, key_dim))  # [H, row/col, N, K]

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.query_proj.weight, std=std)
        bound = 1.0 / math.sqrt(self.key_dim)  # Lample et al. key init
        nn.init.uniform_(self.keys, -bound, bound)
        if hasattr(self.query_norm, "reset_parameters"):
            self.query_norm.reset_parameters()
        if isinstance(self.query_norm, nn.BatchNorm1d):
            self.query_norm.reset_running_stats()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = x.shape[0]
        q = self.query_proj(x)
        if isinstance(self.query_norm, nn.BatchNorm1d):
            q = self.query_norm(q)
        q = q.view(t, self.heads, 2, self.key_dim)
        if isinstance(self.query_norm, nn.LayerNorm):
            q = self.query_norm(q)
        keys = self.keys.to(q.dtype)
        s_row = torch.einsum("thk,hnk->thn", q[:, :, 0], keys[:, 0])  # [T, H, N]
        s_col = torch.einsum("thk,hnk->thn", q[:, :, 1], keys[:, 1])
        return product_key_topk(s_row, s_col, self.k, self.m, impl=self.impl)
