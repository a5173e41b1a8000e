"""Memory+ (Memory Layers at Scale; math.md §5): product keys, multi-head, softmax over the top-m,
SiLU gate ``y = W_o((sum_j w_j V[idx_j]) * SiLU(W_s x))``, one value table shared by all memory
layers of the model (built once in ``build_shared``), constant value LR 1e-3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ultramem.layers.base import ParamGroupHint, SparseLayer
from ultramem.layers.registry import ShapeContext, register_layer
from ultramem.layers.tdqkr import MemoryRetrieval, ProductKeyMemoryConfig, product_key_spec
from ultramem.ops.lookup_reduce import lookup_reduce


@register_layer("memory_plus")
@dataclass
class MemoryPlusConfig(ProductKeyMemoryConfig):
    placement: str = "6:6"
    replace_ffn: bool = False
    n_keys: int = 512  # N keys per side: N^2 shared values
    key_dim: int = 256  # K per side
    heads: int = 4
    topk: int = 32  # m per head
    k: int = 0  # phase-1 candidates (0: = topk)
    value_dim: int = 0  # D_v (0: = d_model, as in the paper; V2 Table 10 uses D/2)
    query_norm: str = "layernorm"
    value_lr: float = 1e-3
    init_std: float = 0.02
    impl: str = "auto"

    def _dense(self, shape: ShapeContext) -> int:
        """Per-layer retrieval + gate W_s [D_v, D] + output W_o [D, D_v]."""
        r = product_key_spec(self, shape.d_model).params()
        return r + 2 * self._dv(shape) * shape.d_model

    def num_params(self, shape: ShapeContext) -> int:
        return self._dense(shape)

    def shared_num_params(self, shape: ShapeContext) -> int:
        return self.n_keys**2 * self._dv(shape)

    def active_params(self, shape: ShapeContext) -> int:
        return self._dense(shape) + self.heads * self.topk * self._dv(shape)

    def flops_per_token(self, shape: ShapeContext) -> int:
        macs = product_key_spec(self, shape.d_model).macs()
        dv = self._dv(shape)
        return 2 * (macs + 2 * dv * shape.d_model + self.heads * self.topk * dv)

    def build_shared(self, shape: ShapeContext) -> nn.Module:
        return SharedValues(self.n_keys**2, self._dv(shape))

    def build(self, shape: ShapeContext, shared: nn.Module | None = None) -> MemoryPlus:
        if shared is None:
            raise ValueError("memory_plus layers need the model's shared value table")
        return MemoryPlus(self, shape, shared)


class SharedValues(nn.Module):
    """One value table ``[N^2, D_v]`` used by every Memory+ layer of a model."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.values = nn.Parameter(torch.empty(rows, dim))

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.values, std=1.0 / math.sqrt(self.values.shape[1]))


class MemoryPlus(SparseLayer):
    """``[B, S, D] -> [B, S, D]``."""

    lookup = staticmethod(lookup_reduce)  # the value-table op: the hook distributed.parallelize shards

    def __init__(self, cfg: MemoryPlusConfig, shape: ShapeContext, shared: SharedValues) -> None:
        super().__init__()
        self.cfg, self.n_layers, self.mem_index = cfg, shape.n_layers, shape.mem_index
        d, dv = shape.d_model, cfg._dv(shape)
        self.retrieval = MemoryRetrieval(product_key_spec(cfg, d), cfg.impl)
        self.gate_proj = nn.Linear(d, dv, bias=False)  # W_s
        self.out_proj = nn.Linear(dv, d, bias=False)  # W_o
        # A plain attribute, not a submodule: the model owns the pool (counted once).
        self.__dict__["shared"] = shared

    @torch.no_grad()
    def init_weights(self) -> None:
        self.retrieval.init_weights(self.cfg.init_std, head_major_keys=True)
        nn.init.normal_(self.gate_proj.weight, std=self.cfg.init_std)
        nn.init.normal_(self.out_proj.weight, std=self.cfg.init_std / math.sqrt(2 * self.n_layers))

    def param_group_hints(self) -> list[ParamGroupHint]:
        if self.mem_index != 0:  # the shared table is hinted once, by the first layer
            return []
        return [ParamGroupHint("memory_plus_values", [self.shared.values], weight_decay=0.0, lr=self.cfg.value_lr, constant_lr=True)]

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        t = flat.shape[0]
        scores, addr = self.retrieval(flat)
        scores, addr = scores[..., 0].contiguous(), addr.contiguous()  # scores were [T, H, m, 1]
        w = scores.float().softmax(-1)
        values = self.shared.values
        pooled = self.lookup(values, addr.view(t, -1), w.view(t, -1).to(values.dtype), impl=self.cfg.impl)[:, 0]
        y = self.out_proj(pooled.to(x.dtype) * F.silu(self.gate_proj(flat)))
        if self.track_metrics:
            self.add_metric("score_mean", scores.float().mean())
        return y.view(shape)
