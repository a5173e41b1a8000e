"""Gradient-norm clipping over the optimiser's groups (``train.grad_clip_mode``).

``global`` (the classic recipe): one L2 norm over every parameter, all gradients scaled by
``min(1, c / norm)``. In a model with memory layers that norm also covers the value tables,
whose gradients are sparse, large and scaled differently from the dense weights' (a row is
hit by few tokens, with raw-score weights), so the value tables set the clip factor of the
dense weights and the dense part no longer trains as the same dense model would.

``exclude_values``: the dense parameters (every group without a sparse-layer hint) are
clipped on their own norm, exactly as in the dense model; the sparse groups (value tables)
are not clipped, as large-embedding trainers treat embedding tables.

``per_group``: the dense parameters as in ``exclude_values``, and each sparse group clipped
on its own norm with the same threshold.

Returned norms are those before clipping: ``grad_norm`` over all parameters (what ``global``
clips on) plus ``grad_norm/dense`` and ``grad_norm/<group>`` for each sparse group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ultramem.train.optim import GroupSpec

CLIP_MODES = ("global", "exclude_values", "per_group")
DENSE_GROUPS = ("decay", "no_decay")  # groups built by build_param_groups, not from hints


def _full(norm: torch.Tensor) -> torch.Tensor:
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP2


def _grads(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def clip_gradients(groups: Sequence[GroupSpec], mode: str, max_norm: float) -> dict[str, float]:
    """Clip the gradients of ``groups`` in place (``max_norm <= 0``: measure only).
    Returns the pre-clip norms (see the module docstring)."""
    if mode not in CLIP_MODES:
        raise ValueError(f"grad clip mode {mode!r}; allowed: {CLIP_MODES}")
    parts = {"dense": [p for g in groups if g.name in DENSE_GROUPS for p in g.params]}
    parts.update({g.name: list(g.params) for g in groups if g.name not in DENSE_GROUPS})
    raw = {k: torch.nn.utils.get_total_norm(_grads(ps), 2.0) for k, ps in parts.items() if _grads(ps)}
    if not raw:
        return {"grad_norm": 0.0}
    norms = {k: _full(v).float() for k, v in raw.items()}
    total = torch.stack(list(norms.values())).pow(2).sum().sqrt()
    if max_norm > 0:
        if mode == "global":  # exactly torch.nn.utils.clip_grad_norm_ over every parameter
            every = [p for ps in parts.values() for p in ps]
            torch.nn.utils.clip_grad_norm_(every, max_norm)
        else:
            for k, norm in raw.items():
                if k == "dense" or mode == "per_group":
                    torch.nn.utils.clip_grads_with_norm_(parts[k], max_norm, norm)
    out = {"grad_norm": float(total)}
    out.update({f"grad_norm/{k}": float(v) for k, v in norms.items()})
    return out
