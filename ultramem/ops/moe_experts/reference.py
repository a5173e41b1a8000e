"""Plain-PyTorch reference of the selected-experts MLP (the decode path of ``layers/moe.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_mlp(x: torch.Tensor, experts: torch.Tensor, w_up: torch.Tensor, w_gate: torch.Tensor | None,
               w_down: torch.Tensor) -> torch.Tensor:
    """``x [T, D]``, ``experts [T, k]`` -> ``[T, k, D]``: token t through expert ``experts[t, j]``
    (``w_up/w_gate [E, D, h]``, ``w_down [E, h, D]``; SwiGLU when ``w_gate`` is given, else
    GELU). Gathers the selected experts' weights (cast to ``x``'s dtype) and runs batched
    matmuls; differentiable."""
    t, k = experts.shape
    idx = experts.flatten()
    up, down = w_up.index_select(0, idx).to(x.dtype), w_down.index_select(0, idx).to(x.dtype)
    xs = x.unsqueeze(1).expand(t, k, x.shape[1]).reshape(t * k, 1, x.shape[1])
    h = torch.bmm(xs, up)
    if w_gate is not None:
        h = F.silu(torch.bmm(xs, w_gate.index_select(0, idx).to(x.dtype))) * h
    else:
        h = F.gelu(h)
    return torch.bmm(h, down).view(t, k, -1)
