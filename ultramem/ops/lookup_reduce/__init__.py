"""Lookup-reduce op: dispatch between the PyTorch reference and the Triton kernels.

Layers call only :func:`lookup_reduce`; ``impl`` follows the rule of
:mod:`ultramem.ops._dispatch` (``auto`` | ``torch`` | ``triton``). The kernels take every shape
and dtype the reference does; the forward kernel is ``triton_forward.py``, the backward
(score and value gradients) ``triton_backward.py``.
"""

from __future__ import annotations

import torch

from ultramem.ops._dispatch import kernels_can_run, kernels_for, load
from ultramem.ops.lookup_reduce import reference

__all__ = ["lookup_reduce", "triton_available"]

FORWARD = "ultramem.ops.lookup_reduce.triton_forward"
BACKWARD = "ultramem.ops.lookup_reduce.triton_backward"


def triton_available(*tensors: torch.Tensor) -> bool:
    """True when the kernels can run on these tensors (CUDA, or CPU under the interpreter)."""
    return kernels_can_run(BACKWARD, *tensors)


class LookupReduce(torch.autograd.Function):
    """Autograd wrapper of the kernels; scores arrive as ``[T, n, h_c]``."""

    @staticmethod
    def forward(ctx, values, idx, scores, block, num_blocks, pre_values, pre_query, activation):
        values, idx, scores = values.contiguous(), idx.contiguous(), scores.contiguous()
        block = block.contiguous() if block is not None and num_blocks > 1 else None
        if pre_values is not None:
            pre_values, pre_query = pre_values.contiguous(), pre_query.contiguous()
        out = load(FORWARD).forward(values, idx, scores, block, num_blocks, pre_values,
                                    pre_query, activation)
        ctx.save_for_backward(values, idx, scores, block, pre_values, pre_query)
        ctx.num_blocks, ctx.activation = num_blocks, activation
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, idx, scores, block, pre_values, pre_query = ctx.saved_tensors
        e, act = ctx.num_blocks, ctx.activation
        fwd, bwd = load(FORWARD), load(BACKWARD)
        grad_out = grad_out.contiguous()
        ds, a, ddot = bwd.backward_scores(values, idx, scores, block, e, pre_values, pre_query,
                                          act, grad_out)
        d_values = d_pre_values = d_pre_query = None
        if ctx.needs_input_grad[0]:
            w = scores.float() if a is None else scores.float() * a.unsqueeze(-1)
            d_values = bwd.scatter_rows(values.shape[0], idx, w.contiguous(), block, e, grad_out,
                                        values.dtype)
        if pre_values is not None:
            if ctx.needs_input_grad[6]:  # d pre_query = sum_j ddot * U[idx]: a lookup-reduce
                d_pre_query = fwd.forward(pre_values, idx, ddot.unsqueeze(-1), None, 1, None,
                                          None, "identity", torch.float32)
                d_pre_query = d_pre_query[:, 0].to(pre_query.dtype)
            if ctx.needs_input_grad[5]:  # d U[idx] += ddot * pre_query: the same scatter
                d_pre_values = bwd.scatter_rows(pre_values.shape[0], idx,
                                                ddot.unsqueeze(-1).contiguous(), None, 1,
                                                pre_query.unsqueeze(1), pre_values.dtype)
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
    if pre_values is not None and pre_query is None:
        raise ValueError("lookup_reduce: pre_values given without pre_query")
    if kernels_for("lookup_reduce", BACKWARD, impl, values, idx, scores) is None:
        return reference.lookup_reduce(values, idx, scores, block, num_blocks, pre_values,
                                       pre_query, activation)
    squeeze = scores.dim() == 2
    s3 = scores.unsqueeze(-1) if squeeze else scores
    blk = block if (block is not None and num_blocks > 1) else None
    return LookupReduce.apply(values, idx, s3, blk, num_blocks, pre_values, pre_query,
                              activation)
