"""Skinny linear op: ``y = x W^T`` for decode-sized ``x`` (a few rows), no bias.

Layers call :func:`skinny_linear` for projections that run once per decoded token. ``impl``:
``"auto"`` | ``"torch"`` | ``"triton"`` as for the other ops (no Triton or no GPU: the
reference, silently). The kernel runs only for inference-shaped calls: at most
``triton.MAX_ROWS`` rows, no gradient recorded for ``x`` or ``weight`` and no autocast;
everything else (training, prefill, a batch of many sequences, autocast regions) is
``F.linear``, so autograd and autocast behave as with ``nn.Linear``.
"""

from __future__ import annotations

import torch

from ultramem.ops._dispatch import kernels_can_run
from ultramem.ops.skinny_linear import reference

__all__ = ["skinny_linear", "triton_available"]

try:  # Triton is optional
    from ultramem.ops.skinny_linear import triton as _kernels
except Exception:  # noqa: BLE001 -- missing triton or a broken install both mean "no kernels"
    _kernels = None


def triton_available(*tensors: torch.Tensor) -> bool:
    """True when the kernel can run on these tensors (CUDA, or CPU under the interpreter)."""
    return kernels_can_run(_kernels, *tensors)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``x [..., K]``, ``weight [N, K]`` -> ``[..., N]``, equal to ``F.linear(x, weight)``."""
    rows = x.numel() // max(x.shape[-1], 1)
    if (impl == "torch" or rows > (_kernels.MAX_ROWS if _kernels else 0)
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            or torch.is_autocast_enabled(x.device.type)
            or x.dtype != weight.dtype or not triton_available(x, weight)):
        return reference.skinny_linear(x, weight)
    x2 = x.reshape(rows, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return _kernels.skinny_linear(x2, weight.contiguous()).view(*x.shape[:-1], weight.shape[0])
