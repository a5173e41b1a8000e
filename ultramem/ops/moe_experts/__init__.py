"""Selected-experts MLP for decode-sized token counts (``layers/moe.py``'s "gather" path).

``expert_mlp(x [T, D], experts [T, k], w_up, w_gate, w_down) -> [T, k, D]``: each token through
each of its k experts, reading only those experts' weights. ``impl``: ``"auto"`` (the Triton
kernel when it can run: CUDA, or CPU under ``TRITON_INTERPRET=1``, no gradient needed) |
``"torch"`` | ``"triton"``.
"""

from __future__ import annotations

import torch

from ultramem.ops._dispatch import kernels_can_run, kernels_for
from ultramem.ops.moe_experts import reference

__all__ = ["expert_mlp", "triton_available"]

KERNELS = "ultramem.ops.moe_experts.triton"  # imported on first use (ops/_dispatch.py)


def triton_available(*tensors: torch.Tensor) -> bool:
    return kernels_can_run(KERNELS, *tensors)


def expert_mlp(x: torch.Tensor, experts: torch.Tensor, w_up: torch.Tensor, w_gate: torch.Tensor | None,
               w_down: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    weights = [w for w in (w_up, w_gate, w_down) if w is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights))
    kernels = kernels_for("moe_experts", KERNELS, impl, x, *weights)
    if kernels is None or needs_grad or not all(w.is_contiguous() for w in weights):
        return reference.expert_mlp(x, experts, w_up, w_gate, w_down)  # the kernel has no backward
    return kernels.expert_mlp(x, experts, w_up, w_gate, w_down)
