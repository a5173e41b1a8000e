"""Triton kernel for the selected-experts MLP at decode: a weight-streaming GEMV per
(assignment, column tile, K split) that reads only the selected experts' weights, once.

The torch reference gathers the selected experts' weights into a new tensor and then runs a
batched matmul: three passes over the bytes (read, write, read). Here program ``(a, n, s)``
loads expert ``e = experts[a]``'s ``[BLOCK_K, BLOCK_N]`` weight tiles straight from the
``[E, K, N]`` parameter (N contiguous: coalesced rows), accumulates ``x[:, None] * w``
elementwise in fp32 and reduces over K once after the loop; K is split so that the grid has
about four programs per SM (decode has few assignments), and the splits meet by an fp32
atomic add. Two launches per MLP: up (and gate, sharing the x loads), then down; the
activation between them is a torch op on ``[T*k, h]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_N, BLOCK_K, WARPS = 64, 64, 4


@triton.jit
def _gemv_kernel(x_ptr, idx_ptr, w_ptr, w2_ptr, y_ptr, y2_ptr, K, N, k_per_split,
                 X_GROUP: tl.constexpr, HAS_W2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y[a, n-tile] += x[a // X_GROUP, k-split] @ W[experts[a], k-split, n-tile]`` (and the
    same with ``W2 -> y2``)."""
    a = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    e = tl.load(idx_ptr + a).to(tl.int64)
    x_row = x_ptr + (a // X_GROUP).to(tl.int64) * K
    k_lo = tl.program_id(2) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_base = e * K * N + rn[None, :]
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        kmask = kk < k_hi
        xk = tl.load(x_row + kk, mask=kmask, other=0.0).to(tl.float32)[:, None]
        offs = w_base + kk.to(tl.int64)[:, None] * N
        m = kmask[:, None] & nmask[None, :]
        acc += xk * tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_W2:
            acc2 += xk * tl.load(w2_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.atomic_add(y_ptr + a * N + rn, tl.sum(acc, axis=0), mask=nmask)
    if HAS_W2:
        tl.atomic_add(y2_ptr + a * N + rn, tl.sum(acc2, axis=0), mask=nmask)


def _programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _gemv(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None, group: int) -> tuple:
    """``x [R, K]`` (R = A / group) through ``w [E, K, N]`` at rows ``idx [A]`` -> fp32 ``[A, N]``
    (and the same for ``w2``)."""
    a, (_, k, n) = idx.numel(), w.shape
    y = torch.zeros(a, n, device=x.device, dtype=torch.float32)
    y2 = torch.zeros_like(y) if w2 is not None else y
    tiles = a * triton.cdiv(n, BLOCK_N)
    splits = max(1, min(triton.cdiv(_programs_target(x.device), tiles), triton.cdiv(k, BLOCK_K)))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), BLOCK_K) * BLOCK_K
    grid = (a, triton.cdiv(n, BLOCK_N), triton.cdiv(k, k_per_split))
    _gemv_kernel[grid](x, idx, w, w2 if w2 is not None else w, y, y2, k, n, k_per_split,
                       X_GROUP=group, HAS_W2=w2 is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                       num_warps=WARPS)
    return y, (y2 if w2 is not None else None)


def expert_mlp(x: torch.Tensor, experts: torch.Tensor, w_up: torch.Tensor, w_gate: torch.Tensor | None,
               w_down: torch.Tensor) -> torch.Tensor:
    """As :func:`ultramem.ops.moe_experts.reference.expert_mlp` (no autograd); contiguous
    ``x`` and weights; the activation in fp32."""
    t, k = experts.shape
    idx = experts.flatten().contiguous()
    up, gate = _gemv(x.contiguous(), idx, w_up, w_gate, group=k)
    h = F.silu(gate) * up if gate is not None else F.gelu(up)
    y, _ = _gemv(h, idx, w_down, None, group=1)
    return y.view(t, k, -1).to(x.dtype)
