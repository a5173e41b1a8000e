"""Product-key memory (Lample et al. 2019; math.md §2): multi-head, query normalisation,
softmax over the top-m scores, ``D_v = D`` by default. Replaces the MLP of its block
(``replace_ffn=true``) or runs parallel to it (the stronger ablation baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ultramem.layers.base import ParamGroupHint, SparseLayer
from ultramem.layers.registry import ShapeContext, register_layer
from ultramem.layers.tdqkr import MemoryRetrieval, ProductKeyMemoryConfig, product_key_spec
from ultramem.ops.lookup_reduce import lookup_reduce


@register_layer("pkm")
@dataclass
class PKMConfig(ProductKeyMemoryConfig):
    placement: str = "6:6"
    replace_ffn: bool = False  # True: the memory replaces its block's MLP (original PKM)
    n_keys: int = 512  # N keys per side (the paper's Knum): N^2 values
    key_dim: int = 512  # K, per side
    heads: int = 4
    topk: int = 32  # m values per head
    k: int = 0  # phase-1 candidates per side (0: = topk)
    value_dim: int = 0  # D_v (0: = d_model; an output projection is added otherwise)
    query_norm: str = "batchnorm"  # Lample: BatchNorm on the query
    softmax: bool = True
    value_lr: float = 1e-3  # constant value LR (Lample)
    init_std: float = 0.02
    impl: str = "auto"

    def _proj(self, shape: ShapeContext) -> int:
        dv = self._dv(shape)
        return 0 if dv == shape.d_model else dv * shape.d_model

    def num_params(self, shape: ShapeContext) -> int:
        r = product_key_spec(self, shape.d_model).params()
        return r + self.n_keys**2 * self._dv(shape) + self._proj(shape)

    def active_params(self, shape: ShapeContext) -> int:
        r = product_key_spec(self, shape.d_model).params()
        return r + self.heads * self.topk * self._dv(shape) + self._proj(shape)

    def flops_per_token(self, shape: ShapeContext) -> int:
        macs = product_key_spec(self, shape.d_model).macs()
        return 2 * (macs + self.heads * self.topk * self._dv(shape) + self._proj(shape))

    def build(self, shape: ShapeContext, shared: nn.Module | None = None) -> PKM:
        return PKM(self, shape)


class PKM(SparseLayer):
    """``[B, S, D] -> [B, S, D]``: ``y = sum_j softmax(s)_j V[addr_j]`` summed over heads."""

    lookup = staticmethod(lookup_reduce)  # the value-table op: the hook distributed.parallelize shards

    def __init__(self, cfg: PKMConfig, shape: ShapeContext) -> None:
        super().__init__()
        self.cfg = cfg
        d, dv = shape.d_model, cfg._dv(shape)
        self.retrieval = MemoryRetrieval(product_key_spec(cfg, d), cfg.impl)
        self.values = nn.Parameter(torch.empty(cfg.n_keys**2, dv))
        self.out_proj = nn.Linear(dv, d, bias=False) if dv != d else None

    @torch.no_grad()
    def init_weights(self) -> None:
        self.retrieval.init_weights(self.cfg.init_std, head_major_keys=True)
        nn.init.normal_(self.values, std=self.values.shape[1] ** -0.5)  # Lample: N(0, 1/D_v)
        if self.out_proj is not None:
            nn.init.normal_(self.out_proj.weight, std=self.cfg.init_std)

    def param_group_hints(self) -> list[ParamGroupHint]:
        return [ParamGroupHint("pkm_values", [self.values], weight_decay=0.0, lr=self.cfg.value_lr, constant_lr=True)]

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scores, addr = self.retrieval(flat)  # [T, H, m]
        scores, addr = scores[..., 0].contiguous(), addr.contiguous()  # scores were [T, H, m, 1]
        w = scores.float().softmax(-1) if self.cfg.softmax else scores
        t = flat.shape[0]
        out = self.lookup(self.values, addr.view(t, -1), w.view(t, -1).to(self.values.dtype), impl=self.cfg.impl)[:, 0]
        if self.out_proj is not None:
            out = self.out_proj(out.to(x.dtype))
        if self.track_metrics:
            self.add_metric("score_mean", scores.float().mean())
            self.add_metric("coverage_batch", addr.unique().numel() / self.values.shape[0])
        return out.to(x.dtype).view(shape)


