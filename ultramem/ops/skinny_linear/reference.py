"""``y = x W^T`` in plain PyTorch: the specification the skinny-linear kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "gelu")


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, activation: str = "identity") -> torch.Tensor:
    """``x [..., K]``, ``weight [N, K]`` -> ``act(x) W^T`` ``[..., N]`` (no bias), as ``F.linear``
    of ``x`` or of ``F.gelu(x)`` (exact GELU; ``activation="gelu"``: a GELU MLP's down
    projection takes its hidden pre-activation)."""
    return F.linear(F.gelu(x) if activation == "gelu" else x, weight)
