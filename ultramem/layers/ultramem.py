"""UltraMem (v1) memory layer (math.md §3). Every item of the paper's Table 2 is a switch.

Shapes: ``x [B, S, D]`` -> ``[T, D]`` tokens; H heads, m selected per head, h_c Tucker cores,
E virtual blocks, P = knum^2 physical rows of dim D_v, N = sqrt(E) * knum keys per side.

    x --query conv (§3.11)--> MemoryRetrieval (§3.3 shared query, §3.5 q/k norm, §3.7 TDQKR,
      §3.8 MCS) --> scores [T, H, m, h_c], addr [T, H, m] in [0, N^2)
    IVE (§3.6): pi(addr) -> block g = pi div P, row rho = pi mod P
    lookup_reduce: o[T, E, D_v] = sum_j [g_j = g] w_j (.) V[rho_j]  (slice c weighted by core c)
    y = W_o [o_0; ...; o_{E-1}]   (§3.2; absent when D_v = D and E = 1, as in PKM)

With every switch off (``softmax=True, query_norm="batchnorm", key_norm="none", share_query=
False, tucker_rank=0, expansion=1, value_dim=0, init="pkm", query_conv=0``, constant value LR
1e-3) the layer computes exactly what the ``pkm`` layer computes (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ultramem.errors import ConfigError
from ultramem.layers.base import ParamGroupHint
from ultramem.layers.memory_common import CoverageTracker, RetrievalLayer, check_common, value_lr_multiplier
from ultramem.layers.registry import MemoryLayerConfig, ShapeContext, register_layer
from ultramem.layers.tdqkr import CausalQueryConv, MemoryRetrieval, RetrievalSpec, calibrate_gains
from ultramem.ops.retrieval import ive_address
from ultramem.ops.skinny_linear import skinny_linear


@register_layer("ultramem")
@dataclass
class UltraMemConfig(MemoryLayerConfig):
    """Defaults: the paper's UltraMem settings (Table 5) at a small size."""

    placement: str = "2:3"  # math.md §1 / §3.4 split + skip, e.g. "3:5/6:8/9:11"
    replace_ffn: bool = False
    knum: int = 64  # sqrt(P): P = knum^2 physical value rows
    expansion: int = 4  # E, implicit value expansion (§3.6); 1 = off; a perfect square
    key_dim: int = 64  # K per side
    heads: int = 2  # H
    topk: int = 16  # m per head
    k: int = 0  # phase-1 candidates per side (0: = topk, as the official code)
    value_dim: int = 0  # D_v (0: = d_model); D_v != D or E > 1 adds the output projection
    softmax: bool = False  # §3.1: False = raw selected scores as weights
    share_query: bool = True  # §3.3: heads share queries in pairs
    query_norm: str = "layernorm"  # §3.5: none | batchnorm (PKM) | layernorm | rmsnorm
    key_norm: str = "layernorm"  # §3.5: none | layernorm | rmsnorm
    tucker_rank: int = 2  # §3.7 TDQKR rank r (0: plain product-key sum scores)
    per_rank_query: bool = False  # §3.7 option: a separate query per rank
    cores: int = 2  # §3.8 h_c (needs tucker_rank >= 1 when > 1)
    tucker_per_head: bool = False  # §3.7: one set of cores and u, v per head (authors' code; off: shared)
    aux_alpha: float = 0.001  # §3.7 singular-value aux loss weight (0: off)
    aux_tau: float = 0.15  # §3.7 margin
    init: str = "improved"  # §3.9: "improved" (Appendix A) | "pkm" (values N(0, 1/D_v)) | "authors"
    init_std: float = 0.02  # query projection (and W_o under init="pkm")
    calib_samples: int = 256  # tokens sampled once at init to set the q/k gains (§3.9)
    value_lr_mult: float = 10.0  # §3.10 M: value LR x M decaying linearly to x1
    value_lr_decay_frac: float = 1.0  # §3.10 T_d as a fraction of training
    value_lr: float = 0.0  # > 0: a fixed value LR instead (PKM: 1e-3)
    value_lr_constant: bool = False  # with value_lr: ignore warmup/cosine (PKM)
    query_conv: int = 4  # §3.11 causal depthwise conv kernel (0: off)
    value_weight_decay: float = 0.0  # AdamW decay of the value table (authors' code: the default 0.1)
    metrics_window: int = 100  # forwards per coverage window (track_metrics only)
    impl: str = "auto"  # op implementation: auto | torch | triton

    # ---- derived sizes ------------------------------------------------------------------
    def n_keys(self) -> int:
        return math.isqrt(self.expansion) * self.knum

    def rows(self) -> int:
        return self.knum**2

    def dv(self, shape: ShapeContext) -> int:
        return self.value_dim or shape.d_model

    def has_proj(self, shape: ShapeContext) -> bool:
        return self.dv(shape) != shape.d_model or self.expansion > 1

    def spec(self, shape: ShapeContext) -> RetrievalSpec:
        return RetrievalSpec(
            d_model=shape.d_model, heads=self.heads, share_query=self.share_query,
            key_dim=self.key_dim, n_keys=self.n_keys(), tucker_rank=self.tucker_rank,
            per_rank_query=self.per_rank_query, cores=self.cores if self.tucker_rank else 1,
            query_norm=self.query_norm, key_norm=self.key_norm, topk=self.topk,
            k=self.k or self.topk, query_conv=self.query_conv,
            tucker_per_head=self.tucker_per_head,
        )

    # ---- accounting (math.md §1) -----------------------------------------------------------
    def _proj_params(self, shape: ShapeContext) -> int:
        return shape.d_model * self.expansion * self.dv(shape) if self.has_proj(shape) else 0

    def num_params(self, shape: ShapeContext) -> int:
        return self.spec(shape).params() + self.rows() * self.dv(shape) + self._proj_params(shape)

    def active_params(self, shape: ShapeContext) -> int:
        return self.spec(shape).params() + self.heads * self.topk * self.dv(shape) + self._proj_params(shape)

    def flops_per_token(self, shape: ShapeContext) -> int:
        macs = self.spec(shape).macs() + self.heads * self.topk * self.dv(shape) + self._proj_params(shape)
        return 2 * macs

    def validate(self, shape: ShapeContext, where: str) -> None:

        check_common(self, shape, where, self.n_keys(), self.k or self.topk)
        e = self.expansion
        if e <= 0 or math.isqrt(e) ** 2 != e:
            raise ConfigError(
                f"{where}.expansion={e} must be a perfect square (N = sqrt(E) * knum keys per side); "
                "allowed: 1, 4, 9, 16, ..."
            )
        if e > 1 and self.n_keys() ** 2 >= 2**31:
            raise ConfigError(
                f"{where}.knum={self.knum} with expansion={e} gives {self.n_keys() ** 2} logical addresses; "
                "the IVE permutation is int32: allowed N^2 < 2^31"
            )
        if self.value_weight_decay < 0:
            raise ConfigError(f"{where}.value_weight_decay={self.value_weight_decay}; allowed: >= 0")
        if self.init not in ("improved", "pkm", "authors"):
            raise ConfigError(f"{where}.init={self.init!r}; allowed: 'improved', 'pkm', 'authors'")

    def build(self, shape: ShapeContext, shared: nn.Module | None = None) -> UltraMem:
        return UltraMem(self, shape)


class UltraMem(RetrievalLayer):
    """``[B, S, D] -> [B, S, D]`` (math.md §3)."""

    def __init__(self, cfg: UltraMemConfig, shape: ShapeContext) -> None:
        super().__init__()
        self.cfg, self.n_layers = cfg, shape.n_layers
        d, dv, e = shape.d_model, cfg.dv(shape), cfg.expansion
        self.d_model, self.value_dim = d, dv
        self.query_conv = CausalQueryConv(d, cfg.query_conv) if cfg.query_conv else None
        self.retrieval = MemoryRetrieval(cfg.spec(shape), cfg.impl)
        self.values = nn.Parameter(torch.empty(cfg.rows(), dv))  # physical table [P, D_v]
        self.out_proj = nn.Linear(e * dv, d, bias=False) if cfg.has_proj(shape) else None  # W_o
        if e > 1:  # §3.6: fixed random permutation of the N^2 logical addresses, saved
            # int32 halves the buffer (N^2 < 2^31 for every preset); widened on lookup
            self.register_buffer("perm", torch.empty(cfg.n_keys() ** 2, dtype=torch.int32))
        else:
            self.perm = None
        self.coverage = CoverageTracker(cfg.rows(), cfg.metrics_window)

    # ---- init (§3.9) ----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        cfg = self.cfg
        if self.query_conv is not None:
            self.query_conv.reset_parameters()
        self.retrieval.init_weights(cfg.init_std)
        if self.perm is not None:
            self.perm.copy_(torch.randperm(self.perm.numel()).to(self.perm.device, torch.int32))
        self.coverage.reset()
        e, dv = cfg.expansion, self.value_dim
        if cfg.init == "improved":
            calibrate_gains(self.retrieval, cfg.calib_samples, cfg.softmax)
            # sigma_V^2 = E / (2 m H L): each virtual block pools ~ m H / E rows with weight ~1
            std = math.sqrt(e / (2 * cfg.topk * cfg.heads * self.n_layers))
            proj_std = 1.0 / math.sqrt(e * dv)  # variance-preserving W_o: y ~ N(0, 1/(2L))
        elif cfg.init == "authors":
            std, proj_std = self._authors_init()
        else:
            std, proj_std = dv**-0.5, cfg.init_std  # Lample et al.: N(0, 1/D_v)
        nn.init.normal_(self.values, std=std)
        if self.out_proj is not None:
            nn.init.normal_(self.out_proj.weight, std=proj_std)

    def _authors_init(self) -> tuple[float, float]:
        """The authors' released code (not Appendix A; docs/layers.md): query projection and
        keys N(0, 1/K), q/k norm gains 1/K^0.33, Tucker cores U(0, 1), values N(0, 0.02^2),
        W_o N(0, 1/(E D_v)). At the 151M size the layer's output starts at std ~0.065 (the
        Appendix-A init: 1/sqrt(2L) = 0.20). Returns (value std, W_o std)."""
        r, k = self.retrieval, self.cfg.key_dim
        nn.init.normal_(r.query_proj.weight, std=k**-0.5)
        nn.init.normal_(r.keys, std=k**-0.5)
        for w in r.gains():
            w.fill_(k**-0.33)
        if r.tucker is not None:
            nn.init.uniform_(r.tucker.cores, 0.0, 1.0)
            r.tucker.u.zero_()
            r.tucker.v.zero_()
            r.tucker.refresh()
        return 0.02, (self.cfg.expansion * self.value_dim) ** -0.5

    def target_output_std(self) -> float:
        """Appendix A: the memory output starts like a residual branch, ``N(0, 1/(2L))``."""
        return math.sqrt(1.0 / (2 * self.n_layers))

    # ---- optimiser hooks ------------------------------------------------------------------
    def param_group_hints(self) -> list[ParamGroupHint]:
        cfg = self.cfg
        if cfg.value_lr > 0:
            return [ParamGroupHint("ultramem_values", [self.values], weight_decay=cfg.value_weight_decay,
                                   lr=cfg.value_lr, constant_lr=cfg.value_lr_constant)]
        mult = value_lr_multiplier(cfg.value_lr_mult, cfg.value_lr_decay_frac)
        return [ParamGroupHint("ultramem_values", [self.values], weight_decay=cfg.value_weight_decay, lr_multiplier=mult)]

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        if self.retrieval.tucker is not None:
            self.retrieval.tucker.refresh()  # §3.7: u, v once per optimiser step

    # ---- forward --------------------------------------------------------------------------
    def address(self, addr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logical ``addr [T, n]`` -> ``(row rho, block g)`` (§3.6); no IVE: ``(addr, None)``."""
        if self.perm is None:
            return addr, None
        return ive_address(addr, self.perm, self.values.shape[0], impl=self.cfg.impl)

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        """Selected scores ``[T, H, m, h_c]`` -> pooling weights (§3.1 softmax switch)."""
        return scores.float().softmax(dim=-2).to(scores.dtype) if self.cfg.softmax else scores

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        cfg, shape = self.cfg, x.shape
        scores, addr = self.retrieve(x, state)  # [T, H, m, h_c], [T, H, m]
        t = scores.shape[0]
        w = self.weights(scores)
        rows, block = self.address(addr.reshape(t, -1))
        pooled = self.lookup(
            self.values, rows, w.reshape(t, -1, w.shape[-1]).to(self.values.dtype), block,
            cfg.expansion, impl=cfg.impl,
        )  # [T, E, D_v]
        out = pooled.reshape(t, -1).to(x.dtype)
        if self.out_proj is not None:
            out = skinny_linear(out, self.out_proj.weight, impl=cfg.impl)  # F.linear but at decode
        self.add_tucker_aux()
        if self.track_metrics:
            self.add_memory_metrics(scores, rows)
            self.add_metric("out_std", out.detach().float().std())  # the branch's scale
        return out.view(shape)
