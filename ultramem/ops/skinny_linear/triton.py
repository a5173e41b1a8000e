"""Triton kernel for ``y = x W^T`` when ``x`` has a few rows (decode): a weight-streaming GEMV.

At one decode token a projection is a pure read of its weight. :func:`_skinny_kernel` gives
every program ``BLOCK_N`` (2) output columns over the whole K, so that each SM has many 2-4 KB
row reads in flight; products accumulate elementwise in an fp32 ``[B, BLOCK_N, BLOCK_K]`` tile
reduced across lanes once, after the loop, and the next step's weight tile is loaded before the
current one is used. Measurements (against cuBLAS, by row count): docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _blocks(rows: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps)`` by the padded row count; the accumulator holds
    ``rows x BLOCK_N x BLOCK_K`` fp32 (8 K for one row)."""
    return 2, max(1024 // rows, 128), 4


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                   BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y[:, n-tile] = x W[n-tile]^T``: one program per ``BLOCK_N`` output columns."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    mmask = rm < M
    w_row = w_ptr + rn.to(tl.int64)[:, None] * K
    acc = tl.zeros([BM, BLOCK_N, BLOCK_K], dtype=tl.float32)
    w = tl.load(w_row + rk[None, :], mask=nmask[:, None] & (rk[None, :] < K), other=0.0)
    for k0 in range(0, K, BLOCK_K):
        kn = k0 + BLOCK_K + rk  # the next step's weight tile, loaded before this one is used
        w_next = tl.load(w_row + kn[None, :], mask=nmask[:, None] & (kn[None, :] < K), other=0.0)
        kk = k0 + rk
        xk = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                     mask=mmask[:, None] & (kk[None, :] < K), other=0.0)
        acc += xk.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        w = w_next
    y = tl.sum(acc, axis=2)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` (M <= 8, unit stride along K), ``weight [N, K]`` contiguous
    -> ``[M, N]`` in ``x``'s dtype."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    bm = triton.next_power_of_2(m)
    bn, bk, warps = _blocks(bm)
    bk = min(bk, triton.next_power_of_2(k))
    _skinny_kernel[(triton.cdiv(n, bn),)](x, weight, y, m, n, k, x.stride(0), y.stride(0), BM=bm,
                                          BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return y
