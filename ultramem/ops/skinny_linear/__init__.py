"""Skinny linear op: ``y = x W^T`` for decode-sized ``x`` (a few rows), no bias.

Layers call :func:`skinny_linear` for projections that run once per decoded token; ``impl``
follows the rule of :mod:`ultramem.ops._dispatch`. The kernel runs only for inference-shaped
calls: at most ``TUNING.skinny_linear_max_rows`` rows (1: a win over cuBLAS at one row, a loss
at four on H200), no gradient recorded for ``x`` or ``weight``, no autocast, one dtype;
everything else (training, prefill, a batch of many sequences, autocast regions) is
``F.linear``, so autograd and autocast behave as with ``nn.Linear``.
"""

from __future__ import annotations

import torch

from ultramem.ops._dispatch import kernels_can_run, kernels_for
from ultramem.ops.skinny_linear import reference
from ultramem.ops.tuning import TUNING

__all__ = ["skinny_linear", "triton_available"]

KERNELS = "ultramem.ops.skinny_linear.triton"
KERNEL_MAX_ROWS = 8  # rows the kernel handles (its accumulator tiles); the tuning field caps it
# cuBLAS's GEMV is faster for weights both wide (N > 2 K) and large (>= 2^22 elements): H200, one
# row, weights past the L2 (docs/results/s7-ab-h200.json): 8192x2048 14.0 vs 10.9 us, 5504x2048
# 10.6 vs 8.3, 50432x2048 64.0 vs 54.4; the kernel wins everywhere else measured (2048x2048 4.6
# vs 6.0, 2048x8192 11.5 vs 14.2, 1024x2048 3.7 vs 12.7, 2048x768 3.3 vs 4.2; 3096x768 a tie)
WIDE_RATIO, WIDE_MIN_ELEMS = 2, 1 << 22


def kernel_shape(n: int, k: int) -> bool:
    """Whether the kernel is the faster one-row GEMV for a ``[n, k]`` weight (see above)."""
    return not (n > WIDE_RATIO * k and n * k >= WIDE_MIN_ELEMS)


def triton_available(*tensors: torch.Tensor) -> bool:
    """True when the kernel can run on these tensors (CUDA, or CPU under the interpreter)."""
    return kernels_can_run(KERNELS, *tensors)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``x [..., K]``, ``weight [N, K]`` -> ``[..., N]``, equal to ``F.linear(x, weight)``."""
    kernels = kernels_for("skinny_linear", KERNELS, impl, x, weight)
    rows = x.numel() // max(x.shape[-1], 1)
    if (kernels is None or rows > min(TUNING.skinny_linear_max_rows, KERNEL_MAX_ROWS)
            or not kernel_shape(weight.shape[0], weight.shape[-1])
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            or torch.is_autocast_enabled(x.device.type) or x.dtype != weight.dtype
            or torch.compiler.is_compiling()):  # compiled: Inductor forms its own GEMV
        return reference.skinny_linear(x, weight)
    x2 = x.reshape(rows, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return kernels.skinny_linear(x2, weight.contiguous()).view(*x.shape[:-1], weight.shape[0])
