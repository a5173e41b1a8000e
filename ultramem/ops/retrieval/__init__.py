"""Retrieval op: dispatch between the PyTorch reference and fused kernels.

Layers call only these functions. ``impl``: ``"auto"`` (a fused kernel where one exists for the
device and inputs, else the reference), ``"torch"`` (always the reference), ``"triton"``.
"""

from __future__ import annotations

import torch

from ultramem.ops.retrieval import reference

__all__ = ["product_key_topk", "tucker_topk"]


def product_key_topk(
    s_row: torch.Tensor, s_col: torch.Tensor, k: int, m: int, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`ultramem.ops.retrieval.reference.product_key_topk`."""
    return reference.product_key_topk(s_row, s_col, k, m)


def tucker_topk(
    s_row: torch.Tensor,
    s_col: torch.Tensor,
    cores: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    k: int,
    m: int,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`ultramem.ops.retrieval.reference.tucker_topk`."""
    return reference.tucker_topk(s_row, s_col, cores, u, v, k, m)
