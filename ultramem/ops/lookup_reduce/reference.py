"""Lookup-reduce in plain PyTorch: the specification the fused kernel is tested against.

``out[t, g, c-slice] = sum_j [block[t, j] == g] * a[t, j] * scores[t, j, c] * V[idx[t, j], c-slice]``

- ``g`` -- virtual block of implicit value expansion (math.md §3.6); 1 block without IVE.
- ``c`` -- multi-core scoring slice (math.md §3.8): the value row is split into ``h_c`` equal
  slices, slice c weighted by core c's score.
- ``a[t, j] = act(<pre_query[t], pre_values[idx[t, j]]>)`` -- UltraMemV2's PEER-style
  pre-value (math.md §4.2); 1 when no pre-values are given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"identity": lambda x: x, "gelu": F.gelu, "silu": F.silu}


def lookup_reduce(
    values: torch.Tensor,
    idx: torch.Tensor,
    scores: torch.Tensor,
    block: torch.Tensor | None = None,
    num_blocks: int = 1,
    pre_values: torch.Tensor | None = None,
    pre_query: torch.Tensor | None = None,
    activation: str = "identity",
) -> torch.Tensor:
    """Weighted sum of selected value rows, grouped by virtual block and split by core.

    Args:
        values: ``[P, D_v]`` value table (physical rows).
        idx: ``[T, n]`` int64 physical rows selected per token (n = heads x top-m).
        scores: ``[T, n, h_c]`` weights (``h_c`` divides ``D_v``); ``[T, n]`` means h_c = 1.
        block: ``[T, n]`` int64 virtual block of each selection in ``[0, num_blocks)``.
        pre_values: ``[P, D_p]`` pre-value table; needs ``pre_query [T, D_p]``.
        activation: ``identity`` | ``gelu`` | ``silu`` applied to the pre-value dot product.

    Returns:
        ``[T, num_blocks, D_v]`` in the dtype of ``values`` (accumulated in fp32).
    """
    if scores.dim() == 2:
        scores = scores.unsqueeze(-1)
    t, n = idx.shape
    h_c = scores.shape[-1]
    p, d_v = values.shape
    rows = values[idx].float()  # [T, n, D_v]
    w = scores.float()  # [T, n, h_c]
    if pre_values is not None:
        if pre_query is None:
            raise ValueError("lookup_reduce: pre_values given without pre_query")
        dots = torch.einsum("tnp,tp->tn", pre_values[idx].float(), pre_query.float())
        w = w * ACTIVATIONS[activation](dots).unsqueeze(-1)
    weighted = (rows.view(t, n, h_c, d_v // h_c) * w.unsqueeze(-1)).view(t, n, d_v)
    if block is None or num_blocks == 1:
        return weighted.sum(1, keepdim=True).to(values.dtype)
    onehot = F.one_hot(block, num_blocks).to(weighted.dtype)  # [T, n, E]
    return torch.einsum("tne,tnd->ted", onehot, weighted).to(values.dtype)
