"""AdamW parameter groups (built explicitly, coverage asserted) and the LR schedule.

Groups (math.md §6 recipe: AdamW beta 0.9/0.95, weight decay 0.1):

- one group per :class:`~ultramem.layers.base.ParamGroupHint` from the sparse layers (value
  tables: their own LR / LR multiplier / weight decay);
- ``decay``: every other parameter with ``ndim >= 2`` outside an ``nn.Embedding`` (the
  projection matrices);
- ``no_decay``: parameters with ``ndim < 2`` (norm gains and biases: decaying them pulls a
  norm towards zero output, not towards a simpler function) and embedding tables (tied with
  the LM head here; rows of rare tokens get few gradient updates, so decay would shrink them
  towards zero regardless of the data -- as in nanochat, which does not decay embeddings).

Parameters are classified by object identity, shape and owning module type -- never by
name -- and :func:`build_param_groups` asserts that every parameter is in exactly one group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ultramem.config import TrainConfig
from ultramem.layers.base import ParamGroupHint, SparseLayer


@dataclass
class GroupSpec:
    name: str
    params: list[nn.Parameter]
    weight_decay: float
    lr: float  # base LR of the group
    constant_lr: bool = False
    lr_multiplier: Callable[[int, int], float] | None = None


def collect_hints(model: nn.Module) -> list[ParamGroupHint]:
    """Hints of every sparse layer, deduplicated (a shared table may be hinted by several
    layers under one name; two different hints for one parameter is an error)."""
    by_name: dict[str, ParamGroupHint] = {}
    owner: dict[int, str] = {}
    for mod in model.modules():
        if not isinstance(mod, SparseLayer):
            continue
        for hint in mod.param_group_hints():
            prev = by_name.get(hint.name)
            if prev is None:
                by_name[hint.name] = ParamGroupHint(**{**hint.__dict__, "params": []})
                prev = by_name[hint.name]
            for p in hint.params:
                if id(p) in owner:
                    if owner[id(p)] != hint.name:
                        raise AssertionError(
                            f"a parameter {tuple(p.shape)} is hinted by both {owner[id(p)]!r} and {hint.name!r}")
                    continue
                owner[id(p)] = hint.name
                prev.params.append(p)
    return list(by_name.values())


def build_param_groups(model: nn.Module, cfg: TrainConfig) -> list[GroupSpec]:
    hints = collect_hints(model)
    hinted = {id(p) for h in hints for p in h.params}
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():  # unique parameters, in registration order
        if not p.requires_grad or id(p) in hinted or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in embedding_params else decay).append(p)
    groups = [
        GroupSpec("decay", decay, cfg.weight_decay, cfg.lr),
        GroupSpec("no_decay", no_decay, 0.0, cfg.lr),
    ]
    for h in hints:
        groups.append(GroupSpec(
            h.name, [p for p in h.params if p.requires_grad],
            cfg.weight_decay if h.weight_decay is None else h.weight_decay,
            cfg.lr if h.lr is None else h.lr, h.constant_lr, h.lr_multiplier,
        ))
    groups = [g for g in groups if g.params]
    check_coverage(model, groups)
    return groups


def check_coverage(model: nn.Module, groups: list[GroupSpec]) -> None:
    """Every trainable parameter in exactly one group, and nothing else in any group."""
    count: dict[int, int] = {}
    for g in groups:
        for p in g.params:
            count[id(p)] = count.get(id(p), 0) + 1
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    dup = [tuple(trainable[i].shape) for i, c in count.items() if c > 1 and i in trainable]
    missing = [tuple(p.shape) for i, p in trainable.items() if i not in count]
    foreign = [i for i in count if i not in trainable]
    assert not dup, f"parameters in more than one optimiser group: {dup}"
    assert not missing, f"parameters in no optimiser group: {missing}"
    assert not foreign, f"{len(foreign)} grouped tensors are not trainable model parameters"


def make_optimizer(groups: list[GroupSpec], cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    fused = device_type == "cuda"
    return torch.optim.AdamW(
        [{"params": g.params, "weight_decay": g.weight_decay, "lr": g.lr, "name": g.name} for g in groups],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused,
    )


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_frac`` of the steps, then cosine to ``min_lr_ratio``.
    ``step`` is the 0-based index of the update being made."""
    warmup = max(1, round(cfg.warmup_frac * cfg.max_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, groups: list[GroupSpec], step: int, cfg: TrainConfig) -> float:
    """Set every group's LR for update ``step``; returns the base schedule's LR."""
    f = lr_factor(step, cfg)
    for pg, g in zip(opt.param_groups, groups):
        lr = g.lr if g.constant_lr else g.lr * f
        if g.lr_multiplier is not None:
            lr *= g.lr_multiplier(step, cfg.max_steps)
        pg["lr"] = lr
    return cfg.lr * f
