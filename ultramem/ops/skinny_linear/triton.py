"""Triton kernel for ``y = x W^T`` when ``x`` has a few rows (decode): a weight-streaming GEMV.

At one decode token a projection is a pure read of its weight, so its time is the weight's
bytes over the bandwidth one launch can pull. cuBLAS reaches about 1.9 TB/s there on an H200
(the UltraMem-1.6B-x12 output projection, 16.8 MB: 7.7 µs with the weight in L2, 11.2 µs
cold; ``docs/results/decode-probe-h200.json``). :func:`_skinny_kernel` gives every program
``BLOCK_N`` (2) output columns over the whole K and as many programs as columns / 2 (448 for
an 896-wide query projection, 1024 for a 2048-wide output projection), so that each SM has
many 2-4 KB row reads in flight; products accumulate elementwise in an fp32 ``[B, BLOCK_N,
BLOCK_K]`` tile and are reduced across lanes once, after the loop (reducing every step, as a
dot product would, measured 2x slower); the next step's weight tile is loaded before the
current one is used. Measured in the same probe: 4.2 µs warm / 7.7 µs cold for the output
projection and 2.5 / 3.8 µs for the query projection (cuBLAS 7.8 / 8.0) at one row. With more
rows cuBLAS wins (4 rows: 25.8 µs against 11.9 for the output projection; 64 rows: 5.3 µs against
8.0 for a dot-based variant), so the dispatcher sends only :data:`MAX_ROWS` (1) row here.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# rows (tokens) up to which the dispatcher uses the kernel. Measured on H200 (layer_decode_prefix
# rows): a win at one row (query projection 2.7 us vs 7.3 for cuBLAS, ops-h200.json), a loss at
# four (output projection 25.8 us vs 11.9 for cuBLAS in the final run; ops-h200-first-run.json
# and ops-h200.json: the [4, 2, 256] accumulator tiles are too small a step);
# the kernel handles up to KERNEL_MAX_ROWS rows (tests raise MAX_ROWS to cover them).
MAX_ROWS = 1
KERNEL_MAX_ROWS = 8


def _blocks(rows: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps)`` by the padded row count; the accumulator holds
    ``rows x BLOCK_N x BLOCK_K`` fp32 (8 K for one row). Override:
    ``ULTRAMEM_SKINNY_BLOCKS="BLOCK_N,BLOCK_K,warps"``."""
    env = os.environ.get("ULTRAMEM_SKINNY_BLOCKS")
    if env:
        bn, bk, w = (int(t) for t in env.split(","))
        return bn, bk, w
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
    """``x [M, K]`` (M <= :data:`MAX_ROWS`, unit stride along K), ``weight [N, K]`` contiguous
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
