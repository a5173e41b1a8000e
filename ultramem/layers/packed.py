"""Projections that read the same input, packed into one weight buffer for inference.

:func:`pack` concatenates the weights of several ``nn.Linear`` (same input, no bias) into one
buffer and makes each parameter a view of its rows: the values, the parameters and the state
dict stay the same, and a step without gradients can project with one GEMM over the buffer
(:func:`project`) instead of one per weight. A decode step at one token reads each weight once
either way; one wide cuBLAS GEMV over the buffer runs closer to the memory bandwidth than
several narrow ones (docs/inference.md). The engine packs its model on CUDA
(:meth:`ultramem.model.transformer.Transformer.pack_projections`).
"""

from __future__ import annotations

import torch
from torch import nn

from ultramem.ops.skinny_linear import skinny_linear


@torch.no_grad()
def pack(owner: nn.Module, linears: tuple[nn.Linear, ...]) -> None:
    """Make the weights of ``linears`` adjacent views of one buffer kept on ``owner`` (an
    attribute, not a buffer: it is not in the state dict). No-op when already packed, on the
    meta device, or when the weights differ in device or dtype."""
    ws = [lin.weight for lin in linears]
    if packed(owner, linears) is not None or len({(w.device, w.dtype) for w in ws}) != 1 or ws[0].is_meta:
        return
    buf = torch.cat([w.detach() for w in ws], 0)
    for w, part in zip(ws, buf.split([w.shape[0] for w in ws], 0)):
        w.data = part
    owner.__dict__["_packed"] = buf


def packed(owner: nn.Module, linears: tuple[nn.Linear, ...]) -> torch.Tensor | None:
    """The ``[sum of out features, in features]`` buffer while the weights are still the views
    :func:`pack` made (a ``.to()``, a load with ``assign`` or a replaced parameter ends it: the
    buffer is dropped), else None. Not under ``torch.compile`` (which fuses by itself)."""
    buf = owner.__dict__.get("_packed")
    if buf is None or torch.compiler.is_compiling():
        return None
    ptr, step = buf.data_ptr(), buf.shape[1] * buf.element_size()
    for lin in linears:
        w = lin.weight
        if w.data_ptr() != ptr or w.dtype != buf.dtype or not w.is_contiguous():
            owner.__dict__.pop("_packed")
            return None
        ptr += w.shape[0] * step
    return buf


def project(owner: nn.Module, linears: tuple[nn.Linear, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of ``linears`` applied to ``x``: one GEMM over the packed buffer, split, when no
    gradient is recorded and the weights are packed; else one ``skinny_linear`` each (the decode
    GEMV kernel for one token, ``F.linear`` otherwise)."""
    buf = None if torch.is_grad_enabled() else packed(owner, linears)
    if buf is not None:
        return skinny_linear(x, buf).split([lin.out_features for lin in linears], -1)
    return tuple(skinny_linear(x, lin.weight) for lin in linears)
