"""Lookup-reduce op: dispatch between the PyTorch reference and the fused kernel.

Layers call only :func:`lookup_reduce`. ``impl``: ``"auto"`` | ``"torch"`` | ``"triton"``.
``auto`` takes the Triton kernels when Triton imports and the tensors are on CUDA (or, for
tests, ``TRITON_INTERPRET=1`` is set and they are on CPU); otherwise the reference, silently.
The value-gradient method is ``DV_METHOD`` (env ``ULTRAMEM_DV_METHOD``, default
``DEFAULT_DV_METHOD``): ``"dense"`` (the whole dense gradient in one row-ordered pass),
``"sort"`` (zero-fill + segment reduce) or ``"atomic"`` (see ``triton.scatter_rows``).
"""

from __future__ import annotations

import os

import torch

from ultramem.ops._dispatch import kernels_can_run
from ultramem.ops.lookup_reduce import reference

__all__ = ["lookup_reduce", "triton_available"]

DEFAULT_DV_METHOD = "dense"  # "dense" | "sort" | "atomic"; H200 timings: docs/results/lr-bwd-h200.json
DV_METHOD = os.environ.get("ULTRAMEM_DV_METHOD", DEFAULT_DV_METHOD)

try:  # Triton is optional: without it every call takes the reference
    from ultramem.ops.lookup_reduce import triton as _kernels
except Exception:  # noqa: BLE001 -- missing triton or a broken install both mean "no kernels"
    _kernels = None


def triton_available(*tensors: torch.Tensor) -> bool:
    """True when the kernels can run on these tensors (CUDA, or CPU under the interpreter)."""
    return kernels_can_run(_kernels, *tensors)


class LookupReduce(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; scores arrive as ``[T, n, h_c]``."""

    @staticmethod
    def forward(ctx, values, idx, scores, block, num_blocks, pre_values, pre_query, activation):
        values, idx, scores = values.contiguous(), idx.contiguous(), scores.contiguous()
        block = block.contiguous() if block is not None and num_blocks > 1 else None
        if pre_values is not None:
            pre_values, pre_query = pre_values.contiguous(), pre_query.contiguous()
        out = _kernels.forward(values, idx, scores, block, num_blocks, pre_values, pre_query,
                               activation)
        ctx.save_for_backward(values, idx, scores, block, pre_values, pre_query)
        ctx.num_blocks, ctx.activation = num_blocks, activation
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, idx, scores, block, pre_values, pre_query = ctx.saved_tensors
        e, act = ctx.num_blocks, ctx.activation
        grad_out = grad_out.contiguous()
        ds, a, ddot = _kernels.backward_scores(values, idx, scores, block, e, pre_values,
                                               pre_query, act, grad_out)
        d_values = d_pre_values = d_pre_query = None
        if ctx.needs_input_grad[0]:
            w = scores.float() if a is None else scores.float() * a.unsqueeze(-1)
            d_values = _kernels.scatter_rows(values.shape[0], idx, w.contiguous(), block, e,
                                             grad_out, values.dtype, DV_METHOD)
        if pre_values is not None:
            if ctx.needs_input_grad[6]:  # d pre_query = sum_j ddot * U[idx]: a lookup-reduce
                d_pre_query = _kernels.forward(pre_values, idx, ddot.unsqueeze(-1), None, 1,
                                               None, None, "identity", torch.float32)
                d_pre_query = d_pre_query[:, 0].to(pre_query.dtype)
            if ctx.needs_input_grad[5]:  # d U[idx] += ddot * pre_query: the same scatter
                d_pre_values = _kernels.scatter_rows(
                    pre_values.shape[0], idx, ddot.unsqueeze(-1).contiguous(), None, 1,
                    pre_query.unsqueeze(1), pre_values.dtype, DV_METHOD)
        d_scores = ds.to(scores.dtype) if ctx.needs_input_grad[2] else None
        return d_values, None, d_scores, None, None, d_pre_values, d_pre_query, None


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
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"lookup_reduce: unknown impl {impl!r}")
    if pre_values is not None and pre_query is None:
        raise ValueError("lookup_reduce: pre_values given without pre_query")
    use_kernel = impl != "torch" and triton_available(values, idx, scores)
    if impl == "triton" and not use_kernel and _kernels is not None and values.is_cuda:
        raise RuntimeError("lookup_reduce: impl='triton' but the inputs do not suit the kernel")
    if not use_kernel:
        return reference.lookup_reduce(values, idx, scores, block, num_blocks, pre_values,
                                       pre_query, activation)
    squeeze = scores.dim() == 2
    s3 = scores.unsqueeze(-1) if squeeze else scores
    blk = block if (block is not None and num_blocks > 1) else None
    return LookupReduce.apply(values, idx, s3, blk, num_blocks, pre_values, pre_query,
                              activation)
