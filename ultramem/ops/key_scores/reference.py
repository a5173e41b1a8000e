"""Key scores in plain PyTorch: the specification the fused kernel is tested against.

``S_side[g', t, g, n, j] = <norm(q[t, g', side, j if rq == r else 0]), keys[side, h, n, j]>``
with ``h = g' * G + g`` (G heads per query group); keys are side-major ``[2, H, N, r, K]``.

- math.md §3.3: heads may share a query (G = 2: heads 2i and 2i+1 use query i); math.md §3.5: the query norm
  (LayerNorm / RMSNorm over the key dim K, or none); math.md §3.7: per-head keys with ``r``
  sub-keys, one query per rank (``rq = r``) or one shared by all ranks (``rq = 1``).
- The keys arrive already key-normed (``MemoryRetrieval.normed_keys``, cached at inference).

``MemoryRetrieval.per_rank_scores`` calls the op after the query projection; the two per-side
tensors are what the retrieval ops take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORMS = ("none", "layernorm", "rmsnorm")
LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default


def resolve_eps(norm: str, eps: float | None, dtype: torch.dtype) -> float:
    """The epsilon a norm adds to the variance / mean square, ``None`` resolved as PyTorch does.

    - ``layernorm``: ``None`` means 1e-5 (``nn.LayerNorm``'s default; ``F.layer_norm`` itself
      needs a number).
    - ``rmsnorm``: ``None`` means the machine epsilon of the type the norm is *computed* in
      (``nn.RMSNorm(eps=None)``, ``F.rms_norm(eps=None)``): ``torch.finfo(torch.float32).eps``
      for fp32, bf16 and fp16 inputs (upcast to fp32: aten ``rms_norm`` takes
      ``numeric_limits<opmath_t>::epsilon()``), ``torch.finfo(torch.float64).eps`` for fp64.
      Not ``torch.finfo(dtype).eps`` of a bf16 / fp16 input, as the ``nn.RMSNorm`` docstring
      reads (tests/ops/test_key_scores.py checks this against ``F.rms_norm``).
    """
    if eps is not None:
        return float(eps)
    if norm == "rmsnorm":
        return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return LAYERNORM_EPS


def check_norm(norm: str, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    """The norm is known and its affine fits it (a bias: layernorm only; a weight: a norm)."""
    if norm not in NORMS:
        raise ValueError(f"key_scores: unknown norm {norm!r} (one of {NORMS})")
    if norm != "layernorm" and bias is not None:
        raise ValueError(f"key_scores: a bias needs norm='layernorm', not {norm!r}")
    if norm == "none" and weight is not None:
        raise ValueError("key_scores: a weight needs a norm")


def query_norm(q: torch.Tensor, norm: str, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float | None = None) -> torch.Tensor:
    """``norm`` over the last dim of ``q``, exactly as ``nn.LayerNorm`` / ``nn.RMSNorm``."""
    check_norm(norm, weight, bias)
    k = q.shape[-1]
    if norm == "layernorm":
        return F.layer_norm(q, (k,), weight, bias, resolve_eps(norm, eps, q.dtype))
    if norm == "rmsnorm":
        return F.rms_norm(q, (k,), weight, resolve_eps(norm, eps, q.dtype))
    return q


def key_scores(
    q: torch.Tensor,
    keys: torch.Tensor,
    norm: str = "layernorm",
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float | None = LAYERNORM_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column key scores of every head.

    Args:
        q: ``[T, Q, 2, rq, K]`` raw projected queries (Q query groups, side row / col,
            ``rq`` = 1 or r query ranks), any float dtype.
        keys: ``[2, H, N, r, K]`` per-head keys, side-major (key norm already applied);
            H a multiple of Q: the G = H / Q heads ``q*G .. q*G + G-1`` share query group q.
        norm: ``"none"`` | ``"layernorm"`` | ``"rmsnorm"`` over K (the query norm, math.md §3.5).
        weight, bias: ``[K]`` affine of the norm (bias: layernorm only); None = no affine.
        eps: see :func:`resolve_eps` (``None``: PyTorch's default of that norm).

    Returns:
        ``s_row, s_col``, each ``[Q, T, G, N, r]``, dtype of ``q`` (for Q = 1 that is
        ``[T, H, N, r]``). With one query for all ranks, the heads of a query group are one
        matmul, ``[T, K] x [K, G*N*r]`` (each side's keys are contiguous). When a gradient is
        recorded each side is its own matmul: as views of one ``[2, ...]`` result, autograd
        would materialise each side's (sparse) gradient at the size of both sides; without
        one, both sides are one batched matmul (one launch).
    """
    t, n_q, _, rq, k = q.shape
    _, h, n, r, _ = keys.shape
    g = h // n_q
    qn = query_norm(q, norm, weight, bias, eps)
    if rq > 1:  # a query per rank: S[.., n, j] = <q_j, K[n, j]>
        kv = keys.view(2, n_q, g, n, r, k)
        return tuple(torch.einsum("tqjk,qgnjk->qtgnj", qn[:, :, side], kv[side]) for side in (0, 1))
    kv = keys.view(2, n_q, g * n * r, k).transpose(-1, -2)  # [2, Q, K, G*N*r]
    q2 = qn[:, :, :, 0].permute(2, 1, 0, 3)  # [2, Q, T, K]
    grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, keys, weight, bias))
    if grad:
        return tuple(torch.matmul(q2[side], kv[side]).view(n_q, t, g, n, r) for side in (0, 1))
    s = torch.matmul(q2, kv).view(2, n_q, t, g, n, r)
    return s[0], s[1]
