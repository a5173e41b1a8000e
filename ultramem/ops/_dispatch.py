"""Shared dispatch rule of every op: may the Triton kernels run on these tensors?"""

from __future__ import annotations

import os
from types import ModuleType

import torch


def kernels_can_run(kernels: ModuleType | None, *tensors: torch.Tensor) -> bool:
    """True when ``kernels`` imported and every tensor is on CUDA, or on the CPU under
    ``TRITON_INTERPRET=1`` (the tests' interpreter mode)."""
    if kernels is None:
        return False
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return all(x.is_cuda or (interp and x.device.type == "cpu") for x in tensors)
