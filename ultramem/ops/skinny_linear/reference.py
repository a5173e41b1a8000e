"""``y = x W^T`` in plain PyTorch: the specification the skinny-linear kernel is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [..., K]``, ``weight [N, K]`` -> ``[..., N]`` (no bias), as ``F.linear``."""
    return F.linear(x, weight)
