"""UltraMemV2 memory layer (math.md §4): a memory layer in every block, PEER-style values.

Shapes: ``x [B, S, D]`` -> ``[T, D]``; H heads, m selected per head, h_c cores, P = knum^2 rows
per layer, ``P_all = L_mem * P`` rows in the one shared pool, ``P' = share_ratio * P_all``
rows in each layer's window, N keys per side (default ``ceil(sqrt(E * P'))`` so the logical
address space covers the window).

    x --MemoryRetrieval (§3.5, §3.7, §3.8; per-rank queries by default)--> scores, addr
    ring map (§4.4): local = addr mod P';  rho = (local + l*P [- (P'-P)/2 centred]) mod P_all
    lookup_reduce with pre-values (§4.2): a_j = phi(<W_pre x, U[rho_j]>),
        o = sum_j a_j s_j^(c) V[rho_j][slice c]     (E virtual blocks summed, §4.3)
    y = W_o o     (one D_v -> D projection)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ultramem.errors import ConfigError
from ultramem.layers.base import ParamGroupHint
from ultramem.layers.memory_common import CoverageTracker, RetrievalLayer, check_common, value_lr_multiplier
from ultramem.layers.registry import MemoryLayerConfig, ShapeContext, register_layer
from ultramem.layers.tdqkr import CausalQueryConv, MemoryRetrieval, RetrievalSpec, calibrate_gains
from ultramem.ops.lookup_reduce.reference import ACTIVATIONS
from ultramem.ops.retrieval import ring_address
from ultramem.ops.skinny_linear import skinny_linear

RINGS = ("forward", "centred")


@register_layer("ultramem_v2")
@dataclass
class UltraMemV2Config(MemoryLayerConfig):
    """Defaults: the V2 paper's choices (math.md §4.6) at a small size."""

    placement: str = "full"  # §4.1: parallel to every block's FFN
    replace_ffn: bool = False
    knum: int = 32  # sqrt(P): P = knum^2 rows owned per layer in the pool
    n_keys: int = 0  # N keys per side (0: ceil(sqrt(E * P')), covering the window)
    expansion: int = 1  # E: logical addresses per physical row; blocks are summed (§4.3)
    key_dim: int = 32  # K per side
    heads: int = 1
    topk: int = 32  # m
    k: int = 0  # phase-1 candidates per side (0: min(topk, 128), the V2 cap)
    value_dim: int = 0  # D_v (0: = d_model)
    pre_value_dim: int = -1  # D_p (-1: = D_v; 0: no pre-values); paper recommends D_p:D_v = 1:3
    activation: str = "identity"  # phi on the pre-value dot product: identity | gelu | silu
    share_query: bool = False
    query_norm: str = "layernorm"
    key_norm: str = "layernorm"
    tucker_rank: int = 2  # r (0: product-key sum scores)
    per_rank_query: bool = False  # §3.7 option (V2 found it slightly better; off in the public config)
    cores: int = 2  # h_c
    tucker_per_head: bool = False  # §3.7: one set of cores and u, v per head (authors' code; off: shared)
    aux_alpha: float = 0.0  # §4.6: Tucker aux loss off
    aux_tau: float = 0.15
    share_ratio: float = 0.5  # §4.4: P' = share_ratio * P_all, in (0, 1]
    ring: str = "forward"  # forward (authors' code) | centred (paper)
    address_shuffle: bool = False  # authors' code: a fixed random permutation of the N^2 logical
    # addresses before the window modulo (off: contiguous, so at E > 1 a token can select one row twice)
    value_weight_decay: float = 0.0  # AdamW decay of the pool (authors' code: the default 0.1)
    init: str = "principled"  # §4.5 "principled" | "std" (every weight N(0, init_std), authors' code)
    init_std: float = 0.0  # linear layers (0: sqrt(2 / (5 D)))
    calib_samples: int = 256
    value_lr_mult: float = 1.0  # §4.6: x1 constant; decay kept as an option
    value_lr_decay_frac: float = 1.0
    value_lr: float = 0.0
    value_lr_constant: bool = False
    query_conv: int = 0
    metrics_window: int = 100
    impl: str = "auto"

    # ---- derived sizes ------------------------------------------------------------------
    def rows(self) -> int:
        return self.knum**2

    def pool_rows(self, shape: ShapeContext) -> int:
        return max(shape.n_mem_layers, 1) * self.rows()

    def window(self, shape: ShapeContext) -> int:
        return max(1, round(self.share_ratio * self.pool_rows(shape)))

    def keys_per_side(self, shape: ShapeContext) -> int:
        return self.n_keys or math.ceil(math.sqrt(self.expansion * self.window(shape)))

    def dv(self, shape: ShapeContext) -> int:
        return self.value_dim or shape.d_model

    def dp(self, shape: ShapeContext) -> int:
        return self.dv(shape) if self.pre_value_dim < 0 else self.pre_value_dim

    def linear_std(self, shape: ShapeContext) -> float:
        return self.init_std or math.sqrt(2.0 / (5.0 * shape.d_model))

    def spec(self, shape: ShapeContext) -> RetrievalSpec:
        return RetrievalSpec(
            d_model=shape.d_model, heads=self.heads, share_query=self.share_query,
            key_dim=self.key_dim, n_keys=self.keys_per_side(shape), tucker_rank=self.tucker_rank,
            per_rank_query=self.per_rank_query, cores=self.cores if self.tucker_rank else 1,
            query_norm=self.query_norm, key_norm=self.key_norm, topk=self.topk,
            k=self.k or min(self.topk, 128), query_conv=self.query_conv,
            tucker_per_head=self.tucker_per_head,
        )

    # ---- accounting (math.md §1) -----------------------------------------------------------
    def _dense(self, shape: ShapeContext) -> int:
        return self.spec(shape).params() + shape.d_model * (self.dp(shape) + self.dv(shape))

    def num_params(self, shape: ShapeContext) -> int:
        return self._dense(shape)

    def shared_num_params(self, shape: ShapeContext) -> int:
        return self.pool_rows(shape) * (self.dv(shape) + self.dp(shape))

    def active_params(self, shape: ShapeContext) -> int:
        return self._dense(shape) + self.heads * self.topk * (self.dv(shape) + self.dp(shape))

    def flops_per_token(self, shape: ShapeContext) -> int:
        sel = self.heads * self.topk * (self.dv(shape) + self.dp(shape))
        return 2 * (self.spec(shape).macs() + shape.d_model * (self.dp(shape) + self.dv(shape)) + sel)

    def validate(self, shape: ShapeContext, where: str) -> None:

        if not 0.0 < self.share_ratio <= 1.0:
            raise ConfigError(f"{where}.share_ratio={self.share_ratio}; allowed: 0 < share_ratio <= 1")
        if self.n_keys < 0:
            raise ConfigError(f"{where}.n_keys={self.n_keys}; allowed: 0 (auto) or a positive integer")
        check_common(self, shape, where, self.keys_per_side(shape), self.k or min(self.topk, 128))
        if self.ring not in RINGS:
            raise ConfigError(f"{where}.ring={self.ring!r}; allowed: {', '.join(RINGS)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{where}.activation={self.activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        if self.value_weight_decay < 0:
            raise ConfigError(f"{where}.value_weight_decay={self.value_weight_decay}; allowed: >= 0")
        if self.address_shuffle and self.keys_per_side(shape) ** 2 >= 2**31:
            raise ConfigError(f"{where}.address_shuffle=true with {self.keys_per_side(shape) ** 2} logical "
                              "addresses; the permutation is int32: allowed N^2 < 2^31")
        if self.init not in ("principled", "std"):
            raise ConfigError(f"{where}.init={self.init!r}; allowed: 'principled', 'std'")
        if self.pre_value_dim < -1:
            raise ConfigError(f"{where}.pre_value_dim={self.pre_value_dim}; allowed: -1 (= D_v), 0 (off), > 0")

    # ---- init (§4.5) ----------------------------------------------------------------------
    def ffn_variance(self, shape: ShapeContext) -> float:
        """Output variance of the host FFN branch at init for unit-variance input: linear std
        ``s`` (this config's), output projection ``s / sqrt(2L)``. The activation's second
        moment is integrated exactly (the paper's 0.064 treats silu(g) u as g u)."""
        d, s = shape.d_model, self.linear_std(shape)
        hidden = shape.ffn_hidden or 4 * d
        v = d * s * s  # pre-activation variance
        z = torch.linspace(-10, 10, 8001, dtype=torch.float64)
        pdf = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0])
        if shape.ffn_gated:
            second = float((F.silu(z * math.sqrt(v)) ** 2 * pdf).sum()) * v
        else:
            second = float((F.gelu(z * math.sqrt(v)) ** 2 * pdf).sum())
        return hidden * second * s * s / (2 * shape.n_layers)

    def value_std(self, shape: ShapeContext, score_rel_var: float) -> float:
        """sigma_V (values and pre-values) equating memory and FFN output variance (§4.5)."""
        d, s = shape.d_model, self.linear_std(shape)
        base = self.dv(shape) * s * s * self.heads * self.topk * (1.0 + score_rel_var)
        if self.dp(shape) == 0:
            return math.sqrt(self.ffn_variance(shape) / base)
        return (self.ffn_variance(shape) / (base * self.dp(shape) * d * s * s)) ** 0.25

    # ---- building -----------------------------------------------------------------------
    def build_shared(self, shape: ShapeContext) -> ValuePool:
        return ValuePool(self, shape)

    def build(self, shape: ShapeContext, shared: nn.Module | None = None) -> UltraMemV2:
        if not isinstance(shared, ValuePool):
            raise ValueError("ultramem_v2 layers need the model's shared value pool (build_shared)")
        return UltraMemV2(self, shape, shared)


class ValuePool(nn.Module):
    """One pool of ``P_all`` rows shared by every V2 layer: ``values [P_all, D_v]`` and
    ``pre_values [P_all, D_p]`` (§4.2, §4.4)."""

    def __init__(self, cfg: UltraMemV2Config, shape: ShapeContext) -> None:
        super().__init__()
        self.cfg, self.shape = cfg, shape
        rows, dp = cfg.pool_rows(shape), cfg.dp(shape)
        self.values = nn.Parameter(torch.empty(rows, cfg.dv(shape)))
        self.pre_values = nn.Parameter(torch.empty(rows, dp)) if dp else None
        self.score_rel_vars: dict[int, float] = {}  # reported by each layer's calibration

    @torch.no_grad()
    def init_weights(self) -> None:
        """Principled: sigma_V from §4.5 with the layers' measured sigma_s^2 (their mean; the
        model initialises layers first). ``init="std"``: N(0, init_std)."""
        cfg = self.cfg
        if cfg.init == "principled":
            rel = sum(self.score_rel_vars.values()) / len(self.score_rel_vars) if self.score_rel_vars else 0.0
            std = cfg.value_std(self.shape, rel)
        else:
            std = cfg.linear_std(self.shape)
        nn.init.normal_(self.values, std=std)
        if self.pre_values is not None:
            nn.init.normal_(self.pre_values, std=std)

    def param_group_hint(self) -> ParamGroupHint:
        cfg = self.cfg
        params = [self.values] + ([self.pre_values] if self.pre_values is not None else [])
        if cfg.value_lr > 0:
            return ParamGroupHint("ultramem_v2_values", params, weight_decay=cfg.value_weight_decay, lr=cfg.value_lr,
                                  constant_lr=cfg.value_lr_constant)
        mult = value_lr_multiplier(cfg.value_lr_mult, cfg.value_lr_decay_frac)
        return ParamGroupHint("ultramem_v2_values", params, weight_decay=cfg.value_weight_decay, lr_multiplier=mult)


def ring_start(layer: int, rows: int, window: int, ring: str) -> int:
    """First pool row (before the modulo) of layer ``layer``'s window (§4.4): a window-local
    address ``a`` in ``[0, P')`` maps to pool row ``(a + ring_start) mod P_all``.

    forward: the window opens at the layer's own table, ``l P``; centred: it is centred on the
    own table, shifted back by ``(P' - P) // 2``."""
    return layer * rows - ((window - rows) // 2 if ring == "centred" else 0)


class UltraMemV2(RetrievalLayer):
    """``[B, S, D] -> [B, S, D]`` (math.md §4)."""

    def __init__(self, cfg: UltraMemV2Config, shape: ShapeContext, pool: ValuePool) -> None:
        super().__init__()
        self.cfg, self.shape, self.mem_index = cfg, shape, shape.mem_index
        d, dv, dp = shape.d_model, cfg.dv(shape), cfg.dp(shape)
        self.rows, self.pool_rows, self.window = cfg.rows(), cfg.pool_rows(shape), cfg.window(shape)
        self.query_conv = CausalQueryConv(d, cfg.query_conv) if cfg.query_conv else None
        self.retrieval = MemoryRetrieval(cfg.spec(shape), cfg.impl)
        self.pre_proj = nn.Linear(d, dp, bias=False) if dp else None  # W_pre
        self.out_proj = nn.Linear(dv, d, bias=False)  # W_o: the single projection (§4.3)
        self.coverage = CoverageTracker(self.window, cfg.metrics_window)
        self.__dict__["pool"] = pool  # not a submodule: the model owns the pool (counted once)
        # The window's start as a tensor, not a Python int: torch.compile would otherwise
        # specialise (and recompile) the forward once per layer.
        self.register_buffer("ring_offset", torch.empty((), dtype=torch.long), persistent=False)
        if cfg.address_shuffle:  # saved with the model, like v1's IVE permutation
            self.register_buffer("perm", torch.empty(cfg.keys_per_side(shape) ** 2, dtype=torch.int32))
        else:
            self.perm = None

    @torch.no_grad()
    def init_weights(self) -> None:
        cfg, std = self.cfg, self.cfg.linear_std(self.shape)
        if self.query_conv is not None:
            self.query_conv.reset_parameters()
        self.retrieval.init_weights(std)
        for lin in (self.pre_proj, self.out_proj):
            if lin is not None:
                nn.init.normal_(lin.weight, std=std)
        self.coverage.reset()
        self.init_buffers()
        if self.perm is not None:
            self.perm.copy_(torch.randperm(self.perm.numel()).to(self.perm.device, torch.int32))
        if cfg.init == "principled":
            _, rel_var = calibrate_gains(self.retrieval, cfg.calib_samples)
            self.pool.score_rel_vars[self.mem_index] = rel_var

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The unsaved window offset (§4.4), e.g. after loading into a model built on meta."""
        self.ring_offset.fill_(ring_start(self.mem_index, self.rows, self.window, self.cfg.ring))

    def param_group_hints(self) -> list[ParamGroupHint]:
        return [self.pool.param_group_hint()] if self.mem_index == 0 else []  # the pool once

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        if self.retrieval.tucker is not None:
            self.retrieval.tucker.refresh()

    def pool_rows_for(self, addr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logical ``addr`` -> ``(local [0, P'), pool row [0, P_all))`` (``address_shuffle``:
        permuted first, as the authors' code does)."""
        return ring_address(addr, self.perm, self.window, self.ring_offset, self.pool_rows, impl=self.cfg.impl)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        cfg, shape = self.cfg, x.shape
        scores, addr = self.retrieve(x, state)  # [T, H, m, h_c], [T, H, m]
        t = scores.shape[0]
        local, rows = self.pool_rows_for(addr.reshape(t, -1))
        pool = self.pool
        # §4.2: the pre-value query is W_pre x -- the block input, not the query conv's output.
        pre_q = None
        if self.pre_proj is not None:  # F.linear, or the decode GEMV kernel
            pre_q = skinny_linear(x.reshape(t, -1), self.pre_proj.weight, impl=cfg.impl).to(pool.values.dtype)
        pooled = self.lookup(
            pool.values, rows, scores.reshape(t, -1, scores.shape[-1]).to(pool.values.dtype),
            pre_values=pool.pre_values, pre_query=pre_q, activation=cfg.activation, impl=cfg.impl,
        )[:, 0]  # [T, D_v]
        y = skinny_linear(pooled.to(x.dtype), self.out_proj.weight, impl=cfg.impl)
        self.add_tucker_aux()
        if self.track_metrics:
            self.add_memory_metrics(scores, local)
        return y.view(shape)
