"""Key-scores op: query norm + per-rank key dot products (docs/math.md §3.7).

Layers call only :func:`key_scores`. There is no Triton kernel: a fused decode kernel measured
slower on an H200 than the reference's LayerNorm + one batched cuBLAS matmul at every decode
batch (best tiles 10.8 / 11.7 / 11.6 / 17.2 us at T 1 / 4 / 16 / 64 against about 8.5-9 us;
docs/results/key-scores-h200.json) and was removed. ``impl`` is validated as for every op; all
three run the reference, whose gradients flow through ``F.layer_norm`` / ``F.rms_norm`` and
``einsum``.
"""

from __future__ import annotations

import torch

from ultramem.errors import ConfigError
from ultramem.ops._dispatch import IMPLS
from ultramem.ops.key_scores import reference
from ultramem.ops.key_scores.reference import check_norm, resolve_eps

__all__ = ["key_scores", "resolve_eps"]


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
    if impl not in IMPLS:
        raise ConfigError(f"key_scores: impl {impl!r} is not one of {', '.join(IMPLS)}")
    _check(q, keys, norm, weight, bias)
    return reference.key_scores(q, keys, norm, weight, bias, eps)
