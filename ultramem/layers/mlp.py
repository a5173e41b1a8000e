"""Dense feed-forward block (math.md §1): GELU (paper) or SwiGLU."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ultramem.errors import ConfigError
from ultramem.layers.base import SparseLayer
from ultramem.layers.packed import pack, project
from ultramem.layers.registry import LayerConfig, ShapeContext, register_layer
from ultramem.ops.skinny_linear import skinny_linear


@register_layer("mlp")
@dataclass
class MLPConfig(LayerConfig):
    """``hidden`` is the inner dim; SwiGLU has two input projections of that width."""

    hidden: int = 4096
    activation: str = "gelu"  # "gelu" | "swiglu"
    init_std: float = 0.02
    out_init_scaled: bool = True  # output proj std / sqrt(2 L), GPT-2 style

    def validate(self, shape: ShapeContext, where: str) -> None:

        if self.hidden <= 0:
            raise ConfigError(f"{where}.hidden={self.hidden} must be a positive integer")
        if self.activation not in ("gelu", "swiglu"):
            raise ConfigError(f"{where}.activation={self.activation!r}; allowed: 'gelu', 'swiglu'")

    def ffn_shape(self) -> tuple[int, bool]:
        return self.hidden, self.activation == "swiglu"

    def matrices(self) -> int:
        return 3 if self.activation == "swiglu" else 2

    def num_params(self, shape: ShapeContext) -> int:
        return self.matrices() * shape.d_model * self.hidden

    def active_params(self, shape: ShapeContext) -> int:
        return self.num_params(shape)

    def flops_per_token(self, shape: ShapeContext) -> int:
        return 2 * self.num_params(shape)

    def build(self, shape: ShapeContext, shared: nn.Module | None = None) -> MLP:
        return MLP(self, shape)


class MLP(SparseLayer):
    """``y = W_down act(W_up x)``; SwiGLU: ``W_down (silu(W_gate x) * W_up x)``. ``[B, S, D]``."""

    def __init__(self, cfg: MLPConfig, shape: ShapeContext) -> None:
        super().__init__()
        self.cfg, self.n_layers = cfg, shape.n_layers
        d = shape.d_model
        self.up_proj = nn.Linear(d, cfg.hidden, bias=False)
        self.gate_proj = nn.Linear(d, cfg.hidden, bias=False) if cfg.activation == "swiglu" else None
        self.down_proj = nn.Linear(cfg.hidden, d, bias=False)

    def init_weights(self) -> None:
        std = self.cfg.init_std
        nn.init.normal_(self.up_proj.weight, std=std)
        if self.gate_proj is not None:
            nn.init.normal_(self.gate_proj.weight, std=std)
        out_std = std / math.sqrt(2 * self.n_layers) if self.cfg.out_init_scaled else std
        nn.init.normal_(self.down_proj.weight, std=out_std)

    def pack_projections(self) -> None:
        """SwiGLU: gate and up weights as views of one buffer (:func:`ultramem.layers.packed.pack`)."""
        if self.gate_proj is not None:
            pack(self, (self.gate_proj, self.up_proj))

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        # skinny_linear: the decode GEMV kernel for one token, F.linear otherwise
        if self.gate_proj is not None:
            g, h = project(self, (self.gate_proj, self.up_proj), x)  # one GEMM when packed
            return skinny_linear(F.silu(g) * h, self.down_proj.weight)
        return skinny_linear(F.gelu(skinny_linear(x, self.up_proj.weight)), self.down_proj.weight)
