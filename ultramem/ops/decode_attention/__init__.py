"""One-token decode attention over a preallocated KV cache (``model/attention.py``'s decode path).

- ``rope_write(q, k, v, cos, sin, pos, k_cache, v_cache) -> q_rot``: rotary on the token's
  query and key heads at ``pos [B]``, key and value stored in the caches at ``pos``;
- ``decode_attention(q [B, H, hd], k_cache, v_cache [B, H_kv, L, hd], lengths [B], kv_len)
  -> [B, H, hd]``: each sequence's one query against its first ``lengths[b]`` (at most
  ``kv_len``) positions, grouped-query heads read their shared key/value head.

``impl`` follows :mod:`ultramem.ops._dispatch`. The kernels (split-KV attention and a fused
rotary + write, ``triton.py``) are inference-only: they have no backward, so a call that records
a gradient takes the reference, as does one whose head dim is odd or whose last dims are not
unit-stride. Nothing syncs with the host: a CUDA graph captures either path.
"""

from __future__ import annotations

import torch

from ultramem.ops._dispatch import kernels_can_run, kernels_for
from ultramem.ops.decode_attention import reference

__all__ = ["decode_attention", "rope_write", "triton_available"]

KERNELS = "ultramem.ops.decode_attention.triton"  # imported on first use (ops/_dispatch.py)


def triton_available(*tensors: torch.Tensor) -> bool:
    """True when the kernels can run on these tensors (CUDA, or CPU under the interpreter)."""
    return kernels_can_run(KERNELS, *tensors)


def _unit(*tensors: torch.Tensor) -> bool:
    return all(t.stride(-1) == 1 for t in tensors)


def _grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     kv_len: int | None = None, impl: str = "auto") -> torch.Tensor:
    """``q [B, H, hd]``, ``k_cache, v_cache [B, H_kv, L, hd]``, ``lengths [B]`` (>= 1 each)
    -> ``[B, H, hd]``, scale ``1 / sqrt(hd)``; ``H`` a multiple of ``H_kv``."""
    kernels = kernels_for("decode_attention", KERNELS, impl, q, k_cache, v_cache, lengths)
    kv_len = k_cache.shape[2] if kv_len is None else min(kv_len, k_cache.shape[2])
    if kernels is None or _grad(q, k_cache, v_cache) or not _unit(q, k_cache, v_cache):
        return reference.decode_attention(q, k_cache, v_cache, lengths, kv_len)
    return kernels.decode_attention(q, k_cache, v_cache, lengths, kv_len)


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``q [B, H, hd]``, ``k, v [B, H_kv, hd]``, tables ``cos, sin [max_seq_len, hd/2]``,
    ``pos [B]`` -> rotated ``q [B, H, hd]``; rotated ``k`` and ``v`` stored in ``k_cache,
    v_cache [B, H_kv, L, hd]`` at ``pos`` (positions ``>= L`` are not stored)."""
    kernels = kernels_for("rope_write", KERNELS, impl, q, k, v, cos, pos, k_cache, v_cache)
    if (kernels is None or _grad(q, k, v) or q.shape[-1] % 2 or not _unit(q, k, v, k_cache, v_cache)
            or not (cos.is_contiguous() and sin.is_contiguous())):
        return reference.rope_write(q, k, v, cos, sin, pos, k_cache, v_cache)
    return kernels.rope_write(q, k, v, cos, sin, pos, k_cache, v_cache)
