"""Optimiser pieces for a model holding ultramem layers: parameter groups with the value-LR rule,
the aux losses, and the once-per-step hook.

    groups = param_groups(model, base_lr=3e-4)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    for step in range(total):
        loss = lm_loss(model(x)) + aux_loss(model)
        loss.backward()
        set_lr(opt, step, total)              # value tables: their own LR rule (math.md §3.10)
        opt.step(); opt.zero_grad()
        after_optimizer_step(model, step)     # e.g. the Tucker rank-1 refresh (math.md §3.7)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ultramem.config import TrainConfig
from ultramem.layers.base import SparseLayer
from ultramem.train.optim import build_param_groups


def param_groups(model: nn.Module, base_lr: float, weight_decay: float = 0.1) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim.AdamW`` (or any optimiser taking groups).

    Value tables get their own group (no weight decay; UltraMem: LR ``x value_lr_mult`` decaying
    to ``x1``, PKM / Memory+: a constant 1e-3), as the layers' hints say; matrices get
    ``weight_decay``; norms, biases and embeddings none. Every trainable parameter of ``model``
    is in exactly one group (checked). Each group carries ``base_lr``, ``constant_lr`` and
    ``lr_multiplier`` for :func:`set_lr`; its ``lr`` is the value for step 0 without a schedule."""
    specs = build_param_groups(model, TrainConfig(lr=base_lr, weight_decay=weight_decay))
    groups = []
    for g in specs:
        mult = g.lr_multiplier(0, 1) if g.lr_multiplier is not None else 1.0
        groups.append({"params": g.params, "lr": g.lr * mult, "weight_decay": g.weight_decay, "name": g.name,
                       "base_lr": g.lr, "constant_lr": g.constant_lr, "lr_multiplier": g.lr_multiplier})
    return groups


def set_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, schedule: float = 1.0) -> None:
    """Set each group's LR for update ``step`` of ``total_steps``: ``base_lr x schedule`` (your
    warmup/cosine factor; constant groups ignore it) ``x lr_multiplier(step, total_steps)``."""
    for g in optimizer.param_groups:
        if "base_lr" not in g:
            continue
        lr = g["base_lr"] * (1.0 if g.get("constant_lr") else schedule)
        if g.get("lr_multiplier") is not None:
            lr *= g["lr_multiplier"](step, total_steps)
        g["lr"] = lr


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the weighted aux losses every ultramem layer of ``model`` added since the last call
    (Tucker singular-value loss, MoE balance), cleared; add it to the training loss."""
    total: torch.Tensor | None = None
    for mod in model.modules():
        if isinstance(mod, SparseLayer):
            aux, _ = mod.pop_aux()
            for v in aux.values():
                total = v if total is None else total + v
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return total


@torch.no_grad()
def after_optimizer_step(model: nn.Module, step: int = 0) -> None:
    """Run every ultramem layer's once-per-optimiser-step hook (UltraMem/V2: refresh the Tucker
    rank-1 approximation used by phase-1 selection, math.md §3.7)."""
    for mod in model.modules():
        if isinstance(mod, SparseLayer):
            mod.after_optimizer_step(step)
