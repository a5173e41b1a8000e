"""Pieces shared by the UltraMem and UltraMemV2 configs and modules: validation of the
retrieval fields, the value-LR multiplier schedule (math.md §3.10), the coverage metric and the
layers' common front half (:class:`RetrievalLayer`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ultramem.errors import ConfigError
from ultramem.layers.base import SparseLayer
from ultramem.layers.registry import ShapeContext
from ultramem.layers.state import LayerState
from ultramem.layers.tdqkr import KEY_NORMS, QUERY_NORMS
from ultramem.ops.lookup_reduce import lookup_reduce

IMPLS = ("auto", "torch", "triton")


class RetrievalLayer(SparseLayer):
    """Base of UltraMem and UltraMemV2: the optional causal query conv (math.md §3.11) feeding the
    retrieval, and the Tucker singular-value aux loss (math.md §3.7). Subclasses set
    ``self.query_conv`` (or None), ``self.retrieval`` and ``self.cfg`` (``aux_alpha``, ``aux_tau``)."""

    # The value-table op, called as ``self.lookup(...)`` with ``lookup_reduce``'s arguments: the
    # one hook ``ultramem.distributed.parallelize`` replaces (per instance) with a sharded lookup.
    lookup = staticmethod(lookup_reduce)

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> LayerState | None:
        return self.query_conv.new_state(batch, device, dtype) if self.query_conv is not None else None

    def retrieve(self, x: torch.Tensor, state: LayerState | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, S, D]`` -> ``(scores [T, H, m, h_c], addr [T, H, m])``."""
        h = self.query_conv(x, state) if self.query_conv is not None else x
        return self.retrieval(h.reshape(-1, x.shape[-1]))

    def add_tucker_aux(self) -> None:
        tucker, cfg = self.retrieval.tucker, self.cfg
        if tucker is not None and cfg.aux_alpha > 0 and self.training:
            self.add_aux_loss("tucker_aux", tucker.aux_loss(cfg.aux_alpha, cfg.aux_tau))

    @torch.no_grad()
    def add_memory_metrics(self, scores: torch.Tensor, slots: torch.Tensor) -> None:
        """Selected-score mean/std, coverage of ``slots`` (``self.coverage``), Tucker singular
        values and aux loss; called only when ``self.track_metrics``."""
        s = scores.float()
        self.add_metric("score_mean", s.mean())
        self.add_metric("score_std", s.std() if s.numel() > 1 else 0.0)
        self.add_metric("coverage", self.coverage.update(slots))
        tucker = self.retrieval.tucker
        if tucker is not None:
            svals = tucker.singular_values()  # [r], or [H, r] per head: report the mean over heads
            for i, sv in enumerate((svals.mean(0) if svals.dim() > 1 else svals).tolist()):
                self.add_metric(f"tucker_sv{i}", sv)
            self.add_metric("tucker_aux", tucker.aux_loss(self.cfg.aux_alpha, self.cfg.aux_tau))


def value_lr_multiplier(mult: float, decay_frac: float) -> Callable[[int, int], float]:
    """``M(t) = 1 + (M - 1) * max(0, 1 - t / T_d)`` with ``T_d = decay_frac * total`` (math.md §3.10),
    applied on top of the normal warmup + cosine schedule."""

    def fn(step: int, total_steps: int) -> float:
        t_d = max(decay_frac * total_steps, 1e-12)
        return 1.0 + (mult - 1.0) * max(0.0, 1.0 - step / t_d)

    return fn


def check_common(cfg: Any, shape: ShapeContext, where: str, n: int, k: int) -> None:
    """Checks shared by ``ultramem`` and ``ultramem_v2`` configs (``n`` keys per side, ``k``
    phase-1 candidates); raises ConfigError."""

    for name in ("knum", "key_dim", "heads", "topk", "expansion", "cores"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{where}.{name}={getattr(cfg, name)} must be a positive integer")
    if k > n:
        raise ConfigError(f"{where}.k={k} exceeds the {n} keys per side; allowed: k <= {n}")
    if cfg.topk > k * k:
        raise ConfigError(
            f"{where}.topk={cfg.topk} exceeds k^2={k * k} phase-1 candidates (k={k}); "
            f"allowed: topk <= k^2 (raise {where}.k or lower {where}.topk)"
        )
    if cfg.tucker_rank < 0:
        raise ConfigError(f"{where}.tucker_rank={cfg.tucker_rank}; allowed: 0 (off) or a positive rank")
    if cfg.cores > 1 and cfg.tucker_rank == 0:
        raise ConfigError(
            f"{where}.cores={cfg.cores} needs Tucker scoring ({where}.tucker_rank >= 1); "
            "multi-core scoring splits the Tucker core"
        )
    if cfg.tucker_per_head and cfg.tucker_rank == 0:
        raise ConfigError(
            f"{where}.tucker_per_head=true needs Tucker scoring ({where}.tucker_rank >= 1); "
            f"set {where}.tucker_rank or {where}.tucker_per_head=false"
        )
    if cfg.value_dim < 0:
        raise ConfigError(f"{where}.value_dim={cfg.value_dim}; allowed: 0 (= d_model) or a positive size")
    dv = cfg.dv(shape)
    if dv % cfg.cores:
        raise ConfigError(
            f"{where}.value_dim={dv} is not divisible by {where}.cores={cfg.cores}; "
            "multi-core scoring splits each value into h_c equal slices"
        )
    if cfg.share_query and cfg.heads % 2:
        raise ConfigError(f"{where}.share_query=true needs an even {where}.heads, got {cfg.heads}")
    if cfg.query_norm not in QUERY_NORMS:
        raise ConfigError(f"{where}.query_norm={cfg.query_norm!r}; allowed: {', '.join(QUERY_NORMS)}")
    if cfg.key_norm not in KEY_NORMS:
        raise ConfigError(f"{where}.key_norm={cfg.key_norm!r}; allowed: {', '.join(KEY_NORMS)}")
    if cfg.aux_alpha < 0 or cfg.aux_tau < 0:
        raise ConfigError(f"{where}.aux_alpha={cfg.aux_alpha}, aux_tau={cfg.aux_tau}; allowed: >= 0")
    if cfg.query_conv < 0:
        raise ConfigError(f"{where}.query_conv={cfg.query_conv}; allowed: 0 (off) or a kernel size >= 1")
    if cfg.value_lr_mult < 1 or not 0 < cfg.value_lr_decay_frac <= 1:
        raise ConfigError(
            f"{where}.value_lr_mult={cfg.value_lr_mult}, value_lr_decay_frac={cfg.value_lr_decay_frac}; "
            "allowed: mult >= 1 and 0 < decay_frac <= 1"
        )
    if cfg.impl not in IMPLS:
        raise ConfigError(f"{where}.impl={cfg.impl!r}; allowed: {', '.join(IMPLS)}")
    if cfg.calib_samples <= 0:
        raise ConfigError(f"{where}.calib_samples={cfg.calib_samples} must be a positive integer")


class CoverageTracker(nn.Module):
    """Fraction of value rows hit at least once within a window of ``window`` forwards.

    ``hits`` is a non-persistent buffer (not saved; cleared by :meth:`reset`)."""

    def __init__(self, rows: int, window: int) -> None:
        super().__init__()
        self.window = max(window, 1)
        self.register_buffer("hits", torch.empty(rows, dtype=torch.bool), persistent=False)
        self.calls = 0

    @torch.no_grad()
    def reset(self) -> None:
        self.hits.zero_()
        self.calls = 0

    def init_buffers(self) -> None:
        """The unsaved counters, e.g. after loading into a model built on meta."""
        self.reset()

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> float:
        """Mark ``rows`` (any shape, ints in ``[0, rows)``); return the window's coverage so far."""
        if self.calls >= self.window:
            self.reset()
        self.hits[rows.reshape(-1)] = True
        self.calls += 1
        return self.hits.float().mean().item()
