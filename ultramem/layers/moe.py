"""Token-choice top-k mixture of experts (SPEC §5): softmax gate, Switch-style balance loss,
optional shared experts and router z-loss, fine-grained expert sizes.

Tokens are sorted by expert and each expert's contiguous segment goes through one matmul:
``torch._grouped_mm`` (one launch for all experts) on CUDA with bf16 where available, else a
loop over experts (never over tokens).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ultramem.errors import ConfigError
from ultramem.layers.base import SparseLayer
from ultramem.layers.mlp import MLPConfig
from ultramem.layers.registry import LayerConfig, ShapeContext, register_layer


@register_layer("moe")
@dataclass
class MoEConfig(LayerConfig):
    """UltraMem's baseline is "2-in-N" (top_k 2); UltraMemV2's is OLMoE-style 8-of-64 SwiGLU."""

    n_experts: int = 32
    top_k: int = 2
    hidden: int = 2528  # each expert's inner dim
    activation: str = "gelu"  # "gelu" | "swiglu"
    n_shared: int = 0  # shared experts every token uses
    shared_hidden: int = 0  # inner dim of each shared expert (0: same as hidden)
    balance_weight: float = 0.01  # Switch balance loss weight (SPEC §5 / §6: 0.01)
    z_loss_weight: float = 0.0  # router z-loss weight (ST-MoE); 0 = off
    normalize_top_k: bool = False  # renormalise the k gate probabilities to sum to 1
    init_std: float = 0.02
    impl: str = "auto"  # "auto" | "grouped_mm" | "loop"

    def validate(self, shape: ShapeContext, where: str) -> None:

        for name in ("n_experts", "top_k", "hidden"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name}={getattr(self, name)} must be a positive integer")
        if self.top_k > self.n_experts:
            raise ConfigError(
                f"{where}.top_k={self.top_k} exceeds {where}.n_experts={self.n_experts}; "
                "allowed: 1 <= top_k <= n_experts"
            )
        if self.activation not in ("gelu", "swiglu"):
            raise ConfigError(f"{where}.activation={self.activation!r}; allowed: 'gelu', 'swiglu'")
        if self.impl not in ("auto", "grouped_mm", "loop"):
            raise ConfigError(f"{where}.impl={self.impl!r}; allowed: 'auto', 'grouped_mm', 'loop'")
        if self.n_shared < 0 or self.balance_weight < 0 or self.z_loss_weight < 0:
            raise ConfigError(f"{where}: n_shared, balance_weight and z_loss_weight must be >= 0")

    def ffn_shape(self) -> tuple[int, bool]:
        return self.hidden, self.activation == "swiglu"  # each expert's width (SPEC §4.5 init)

    def _mats(self) -> int:
        return 3 if self.activation == "swiglu" else 2

    def _shared(self, d: int) -> int:
        return self.n_shared * self._mats() * d * (self.shared_hidden or self.hidden)

    def num_params(self, shape: ShapeContext) -> int:
        d = shape.d_model
        return d * self.n_experts + self.n_experts * self._mats() * d * self.hidden + self._shared(d)

    def active_params(self, shape: ShapeContext) -> int:
        d = shape.d_model
        return d * self.n_experts + self.top_k * self._mats() * d * self.hidden + self._shared(d)

    def flops_per_token(self, shape: ShapeContext) -> int:
        return 2 * self.active_params(shape)

    def build(self, shape: ShapeContext, shared: nn.Module | None = None) -> MoE:
        return MoE(self, shape)


def switch_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer balance loss generalised to top-k: ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the T*k assignments that go to expert e, ``P_e`` the mean router
    probability of e over tokens. Equals 1 for perfectly uniform routing.
    ``probs: [T, E]``, ``topk_idx: [T, k]``.
    """
    counts = torch.bincount(topk_idx.flatten(), minlength=n_experts).to(probs.dtype)
    f = counts / topk_idx.numel()
    return n_experts * (f * probs.mean(0)).sum()


def route(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[T, E]`` logits -> ``(probs [T, E], gates [T, k], experts [T, k])`` (fp32 softmax)."""
    probs = router_logits.float().softmax(-1)
    gates, experts = probs.topk(top_k, dim=-1)
    if normalize:
        gates = gates / gates.sum(-1, keepdim=True)
    return probs, gates, experts


def sort_by_expert(experts: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``experts [T, k]`` -> ``(order [T*k], token_of [T*k], counts [E])``: assignments sorted
    by expert; ``token_of`` is the token each sorted assignment belongs to."""
    flat = experts.flatten()
    order = torch.argsort(flat, stable=True)
    token_of = torch.div(order, experts.shape[1], rounding_mode="floor")
    counts = torch.bincount(flat, minlength=n_experts)
    return order, token_of, counts


class MoE(SparseLayer):
    """``[B, S, D] -> [B, S, D]``; expert weights ``w_up/w_gate [E, D, h]``, ``w_down [E, h, D]``."""

    def __init__(self, cfg: MoEConfig, shape: ShapeContext) -> None:
        super().__init__()
        self.cfg, self.n_layers = cfg, shape.n_layers
        d, e, h = shape.d_model, cfg.n_experts, cfg.hidden
        self.router = nn.Linear(d, e, bias=False)
        self.w_up = nn.Parameter(torch.empty(e, d, h))
        self.w_gate = nn.Parameter(torch.empty(e, d, h)) if cfg.activation == "swiglu" else None
        self.w_down = nn.Parameter(torch.empty(e, h, d))
        self._grouped_failed = False
        self.shared_experts = None
        if cfg.n_shared:
            mlp = MLPConfig(hidden=cfg.n_shared * (cfg.shared_hidden or h), activation=cfg.activation, init_std=cfg.init_std)
            self.shared_experts = mlp.build(shape)

    def init_weights(self) -> None:
        std = self.cfg.init_std
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.w_up, std=std)
        if self.w_gate is not None:
            nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_down, std=std / math.sqrt(2 * self.n_layers))
        if self.shared_experts is not None:
            self.shared_experts.init_weights()

    def _use_grouped(self, x: torch.Tensor) -> bool:
        ok = hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
        if self.cfg.impl == "grouped_mm" and not ok:
            raise RuntimeError("moe.impl='grouped_mm' needs CUDA, bf16 and torch._grouped_mm")
        return ok and self.cfg.impl != "loop"

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All experts in one ``torch._grouped_mm`` launch per projection."""
        offs = torch.cumsum(counts, 0).to(torch.int32)

        def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch._grouped_mm(a, w.to(a.dtype), offs=offs)

        h = mm(xs, self.w_up)
        h = F.silu(mm(xs, self.w_gate)) * h if self.w_gate is not None else F.gelu(h)
        return mm(h, self.w_down)

    def _loop(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One matmul per expert over its contiguous segment (a loop over experts, not tokens)."""
        outs = []
        for e, seg in enumerate(xs.split(counts.tolist())):
            if seg.shape[0] == 0:
                continue
            h = seg @ self.w_up[e].to(seg.dtype)
            h = F.silu(seg @ self.w_gate[e].to(seg.dtype)) * h if self.w_gate is not None else F.gelu(h)
            outs.append(h @ self.w_down[e].to(seg.dtype))
        return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[1])

    def _experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Apply each expert to its contiguous segment of ``xs [T*k, D]`` (sorted by expert)."""
        if self._use_grouped(xs) and not self._grouped_failed:
            try:
                return self._grouped(xs, counts)
            except RuntimeError as err:  # shapes/strides this torch build's kernel rejects
                if self.cfg.impl == "grouped_mm":
                    raise
                warnings.warn(f"MoE: torch._grouped_mm failed ({err}); using the per-expert loop", stacklevel=2)
                self._grouped_failed = True
        return self._loop(xs, counts)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, D]
        logits = self.router(flat)
        probs, gates, experts = route(logits, self.cfg.top_k, self.cfg.normalize_top_k)
        if self.training and self.cfg.balance_weight > 0:
            self.add_aux_loss("balance", self.cfg.balance_weight * switch_balance_loss(probs, experts, self.cfg.n_experts))
        if self.training and self.cfg.z_loss_weight > 0:
            self.add_aux_loss("z_loss", self.cfg.z_loss_weight * torch.logsumexp(logits.float(), -1).pow(2).mean())
        order, token_of, counts = sort_by_expert(experts, self.cfg.n_experts)
        ys = self._experts(flat[token_of], counts)  # [T*k, D], sorted by expert
        ys = ys * gates.flatten()[order].unsqueeze(-1).to(ys.dtype)
        out = torch.zeros_like(flat).index_add_(0, token_of, ys.to(flat.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        if self.track_metrics:
            load = counts.float() / counts.sum()
            self.add_metric("load_max", load.max() * self.cfg.n_experts)
            self.add_metric("router_entropy", -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean())
        return out.view(shape)
