"""Key-scores op: dispatch between the PyTorch reference and the fused decode kernel.

Layers call only :func:`key_scores`. ``impl``: ``"auto"`` | ``"torch"`` | ``"triton"``.
``auto`` and ``triton`` take the Triton kernel when Triton imports and the tensors are on CUDA
(or, for tests, ``TRITON_INTERPRET=1`` is set and they are on CPU) and the call suits it;
otherwise the reference, silently. ``torch`` always runs the reference.

The kernel is off by default (``triton.USE_KERNEL``: it measured slower than the reference's
LayerNorm + one batched cuBLAS matmul at decode on an H200); when on, it is for decode and
inference only; it has no backward, so there is no autograd
Function: it runs only when no gradient is being recorded for an input
(``torch.is_grad_enabled()`` and any input ``requires_grad`` -> the reference, whose
gradients flow through ``F.layer_norm`` / ``F.rms_norm`` and ``einsum``), for
``T <= triton.MAX_T`` tokens, ``K <= triton.MAX_K``, fp32 / bf16 / fp16 queries with keys of
the same dtype, and ``rq`` 1 or r.
"""

from __future__ import annotations

import torch

from ultramem.ops._dispatch import kernels_can_run
from ultramem.ops.key_scores import reference
from ultramem.ops.key_scores.reference import check_norm, resolve_eps

__all__ = ["key_scores", "resolve_eps", "triton_available"]

try:  # Triton is optional: without it every call takes the reference
    from ultramem.ops.key_scores import triton as _kernels
except Exception:  # noqa: BLE001 -- missing triton or a broken install both mean "no kernels"
    _kernels = None


def triton_available(*tensors: torch.Tensor) -> bool:
    """True when the kernel can run on these tensors (CUDA, or CPU under the interpreter)."""
    return kernels_can_run(_kernels, *tensors)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def _check(q: torch.Tensor, keys: torch.Tensor, norm: str,
           weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    check_norm(norm, weight, bias)
    if q.dim() != 5 or keys.dim() != 5 or q.shape[2] != 2 or keys.shape[0] != 2:
        raise ValueError(f"key_scores: q [T, Q, 2, rq, K] and keys [2, H, N, r, K], got "
                         f"{tuple(q.shape)} and {tuple(keys.shape)}")
    k, r = q.shape[-1], keys.shape[3]
    if keys.shape[-1] != k or q.shape[3] not in (1, r):
        raise ValueError(f"key_scores: K or rq mismatch: q {tuple(q.shape)}, "
                         f"keys {tuple(keys.shape)}")
    if keys.shape[1] % q.shape[1]:
        raise ValueError(f"key_scores: the heads H = {keys.shape[1]} must be a multiple of the "
                         f"query groups Q = {q.shape[1]} (G = H / Q heads share a query)")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (k,):
            raise ValueError(f"key_scores: {name} must be [K] = [{k}], got {tuple(p.shape)}")


def key_scores(
    q: torch.Tensor,
    keys: torch.Tensor,
    norm: str = "layernorm",
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float | None = reference.LAYERNORM_EPS,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [T, Q, 2, rq, K]``, ``keys [2, H, N, r, K]`` -> ``s_row, s_col [Q, T, G, N, r]``
    (dtype of ``q``; G = H / Q heads per query group); see
    :func:`ultramem.ops.key_scores.reference.key_scores`. ``eps=None``: PyTorch's default of
    the norm (:func:`resolve_eps`; pass the module's ``eps`` to match ``nn.LayerNorm`` /
    ``nn.RMSNorm`` exactly)."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"key_scores: unknown impl {impl!r}")
    _check(q, keys, norm, weight, bias)
    tensors = [x for x in (q, keys, weight, bias) if x is not None]
    use_kernel = (impl != "torch" and triton_available(*tensors) and _kernels.USE_KERNEL
                  and not _needs_grad(q, keys, weight, bias)
                  and _kernels.supported(q, keys, norm))
    if not use_kernel:
        return reference.key_scores(q, keys, norm, weight, bias, eps)
    return _kernels.key_scores(q, keys, norm, weight, bias,
                               resolve_eps(norm, eps, q.dtype))
