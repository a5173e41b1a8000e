"""The dispatch rule of every op, and the kernels' import on first use.

``impl``: ``"torch"`` always runs the op's PyTorch reference. ``"auto"`` runs the Triton kernels
where they can run (Triton imports, and every tensor is on CUDA, or on the CPU under
``TRITON_INTERPRET=1``, the tests' interpreter) and the reference otherwise. ``"triton"`` asks
for the kernels: where they cannot run it raises :class:`~ultramem.errors.ConfigError` with the
reason. Where a call's shape, dtype or autograd state does not suit a kernel, every op takes its
reference for that call (each dispatcher's docstring says when).

A kernel module is imported on the first call that may use it, so ``import ultramem`` and
building a model do not import Triton.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from ultramem.errors import ConfigError

IMPLS = ("auto", "torch", "triton")

_LOADED: dict[str, ModuleType | None] = {}  # kernel module name -> module, None: failed import
_FAILED: dict[str, str] = {}  # kernel module name -> why its import failed


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton runs kernels on CPU tensors (read per call)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def load(module: str) -> ModuleType | None:
    """The kernel module, imported on first use; None when Triton (or the module) fails."""
    if module not in _LOADED:
        try:
            _LOADED[module] = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 -- missing triton or a broken install: no kernels
            _LOADED[module] = None
            _FAILED[module] = f"{type(e).__name__}: {e}"
    return _LOADED[module]


def _device_reason(tensors: tuple[torch.Tensor, ...]) -> str | None:
    """Why the kernels cannot run on these tensors' devices, or None when they can."""
    for x in tensors:
        if not (x.is_cuda or (x.device.type == "cpu" and interpreting())):
            return (f"a tensor is on {x.device}; the Triton kernels need CUDA tensors "
                    "(or CPU tensors under TRITON_INTERPRET=1)")
    return None


def kernels_for(op: str, module: str, impl: str, *tensors: torch.Tensor) -> ModuleType | None:
    """The kernel module ``op`` may use for this call, or None for the reference (see the
    module docstring); raises ConfigError for an unknown ``impl`` or for ``impl="triton"`` where
    the kernels cannot run."""
    if impl not in IMPLS:
        raise ConfigError(f"{op}: impl {impl!r} is not one of {', '.join(IMPLS)}")
    if impl == "torch":
        return None
    reason = _device_reason(tensors)
    if reason is None:
        kernels = load(module)
        if kernels is not None:
            return kernels
        reason = f"the Triton kernels did not import ({_FAILED.get(module, 'disabled')})"
    if impl == "triton":
        raise ConfigError(f"{op}: impl='triton' but {reason}; use impl='auto' (falls back to "
                          "the PyTorch reference) or impl='torch'")
    return None


def kernels_can_run(module: str, *tensors: torch.Tensor) -> bool:
    """True when ``impl="auto"`` would take the kernels of ``module`` on these tensors."""
    return _device_reason(tensors) is None and load(module) is not None
