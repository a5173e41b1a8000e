"""Bit-exact repeatability: ``train.deterministic`` = ``auto`` (on for CPU, off for CUDA),
``on`` or ``off``.

On CPU with several threads, the backward of gathers (``values[idx]`` in the memory layers'
lookup, embedding rows) accumulates in a thread-dependent order, so two runs of tiny-ultramem
drifted apart from step ~7 (and ``make demo``'s verdict could flip). With the setting on,
:func:`torch.use_deterministic_algorithms` picks the ordered implementations: two runs, and a
run and its resume, give bit-identical losses at any thread count (tested). On CUDA ``on``
also sets ``CUBLAS_WORKSPACE_CONFIG`` and cuDNN's deterministic mode and only warns for ops
without a deterministic kernel (the Triton kernels are deterministic by construction or not,
independently of this switch; see docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def wanted(mode: str, device: torch.device) -> bool:
    return mode == "on" or (mode == "auto" and device.type == "cpu")


@contextlib.contextmanager
def determinism(mode: str, device: torch.device) -> Iterator[bool]:
    """Set the mode for the duration of a run (process-global in torch), then restore it."""
    on = wanted(mode, device)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic)
    if on:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    elif mode == "off":
        torch.use_deterministic_algorithms(False)
    try:
        yield on
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic = before[2]
