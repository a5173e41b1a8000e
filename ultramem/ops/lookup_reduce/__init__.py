"""Lookup-reduce op: dispatch between the PyTorch reference and the fused kernel.

Layers call only :func:`lookup_reduce`. ``impl``: ``"auto"`` | ``"torch"`` | ``"triton"``.
"""

from __future__ import annotations

import torch

from ultramem.ops.lookup_reduce import reference

__all__ = ["lookup_reduce"]


def lookup_reduce(
    values: torch.Tensor,
    idx: torch.Tensor,
    scores: torch.Tensor,
    block: torch.Tensor | None = None,
    num_blocks: int = 1,
    pre_values: torch.Tensor | None = None,
    pre_query: torch.Tensor | None = None,
    activation: str = "identity",
    impl: str = "auto",
) -> torch.Tensor:
    """See :func:`ultramem.ops.lookup_reduce.reference.lookup_reduce`."""
    return reference.lookup_reduce(
        values, idx, scores, block, num_blocks, pre_values, pre_query, activation
    )
