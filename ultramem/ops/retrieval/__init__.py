"""Retrieval op: dispatch between the PyTorch reference and the Triton kernels.

Layers call only these functions; ``impl`` follows the rule of :mod:`ultramem.ops._dispatch`
(``auto`` | ``torch`` | ``triton``). Shapes the kernels do not take (``triton.supported``: N
above 16384, m above 1024) run the reference.

The kernels return indices and scores; when autograd is recording and an input needs a
gradient, the selected scores are recomputed in PyTorch from the kernel's addresses (a gather
and a tiny einsum), so gradients reach ``s_row``, ``s_col`` and ``cores`` exactly as through
the reference.
"""

from __future__ import annotations

import torch

from ultramem.ops._dispatch import kernels_can_run, kernels_for
from ultramem.ops.retrieval import reference

__all__ = ["ive_address", "product_key_topk", "ring_address", "tucker_topk", "triton_available"]

KERNELS = "ultramem.ops.retrieval.triton"


def triton_available(*tensors: torch.Tensor) -> bool:
    """True when the kernels can run on these tensors (CUDA, or CPU under the interpreter)."""
    return kernels_can_run(KERNELS, *tensors)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in tensors)


def _gather(s: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """``s [..., N, r]``, ``i [..., m]`` -> ``[..., m, r]``."""
    return s.gather(-2, i.unsqueeze(-1).expand(*i.shape, s.shape[-1]))


def product_key_topk(
    s_row: torch.Tensor, s_col: torch.Tensor, k: int, m: int, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`ultramem.ops.retrieval.reference.product_key_topk`."""
    n = s_row.shape[-1]
    kernels = kernels_for("product_key_topk", KERNELS, impl, s_row, s_col)
    if kernels is None or not kernels.supported(n, k, m):
        return reference.product_key_topk(s_row, s_col, k, m)
    lead = s_row.shape[:-1]
    scores, addr = kernels.topk(s_row.detach().reshape(-1, n).contiguous(),
                                s_col.detach().reshape(-1, n).contiguous(), None, None, None,
                                k, m, sum_mode=True)
    addr = addr.view(*lead, m)
    if _needs_grad(s_row, s_col):
        scores = s_row.gather(-1, addr // n) + s_col.gather(-1, addr % n)
    return scores.view(*lead, m), addr


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
    n, r = s_row.shape[-2:]
    kernels = kernels_for("tucker_topk", KERNELS, impl, s_row, s_col, cores)
    if kernels is None or not kernels.supported(n, k, m):
        return reference.tucker_topk(s_row, s_col, cores, u, v, k, m)
    lead = s_row.shape[:-2]
    h_c = cores.shape[0]
    scores, addr = kernels.topk(
        s_row.detach().reshape(-1, n, r).contiguous(), s_col.detach().reshape(-1, n, r).contiguous(),
        cores.detach().contiguous(), u.detach().contiguous(), v.detach().contiguous(), k, m,
        sum_mode=False)  # any float dtype: the kernels load and compute in fp32
    addr = addr.view(*lead, m)
    if _needs_grad(s_row, s_col, cores):
        rows, cols = _gather(s_row, addr // n), _gather(s_col, addr % n)  # [..., m, r]
        scores = torch.einsum("...mr,crs,...ms->...mc", rows, cores.to(rows.dtype), cols)
    return scores.view(*lead, m, h_c), addr


def ive_address(
    addr: torch.Tensor, perm: torch.Tensor, num_rows: int, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`ultramem.ops.retrieval.reference.ive_address` (one launch with the kernel;
    the reference takes four: a gather, a cast, a remainder and a division)."""
    kernels = kernels_for("ive_address", KERNELS, impl, addr, perm)
    if kernels is None:
        return reference.ive_address(addr, perm, num_rows)
    return kernels.ive_address(addr, perm, num_rows)


def ring_address(
    addr: torch.Tensor, perm: torch.Tensor | None, window: int, offset: torch.Tensor, pool_rows: int,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`ultramem.ops.retrieval.reference.ring_address` (one launch with the kernel;
    the reference takes three or four: gather, remainder, add, remainder)."""
    tensors = (addr, offset) if perm is None else (addr, offset, perm)
    kernels = kernels_for("ring_address", KERNELS, impl, *tensors)
    if kernels is None:
        return reference.ring_address(addr, perm, window, offset, pool_rows)
    return kernels.ring_address(addr, perm, window, offset, pool_rows)
