"""Measurement helpers shared by the benchmark scripts (``ops.py``, ``explore/``): one
definition of the copy-bandwidth ceiling, CUDA-graph timing, the clock warm-up and the skewed
index distribution, so every script measures the same way."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ultramem.inference.bench import time_replays


def copy_gbps(device: str, dtype: torch.dtype, timer: Callable[[Callable], float],
              numel: int = 1 << 29) -> float:
    """Copy bandwidth, read + write bytes over the median time of ``y.copy_(x)`` (1 GiB of
    bf16 by default), printed and returned in GB/s."""
    x = torch.randn(numel, device=device, dtype=dtype)
    y = torch.empty_like(x)
    ms = timer(lambda: y.copy_(x))
    gbps = 2 * x.numel() * x.element_size() / ms / 1e6
    print(f"copy bandwidth {gbps:.0f} GB/s (read + write of {x.nbytes / 2**30:.2f} GiB)", flush=True)
    return gbps


def graph_time(fn: Callable, calls: int = 20, reps: int = 25) -> float:
    """Median ms per call of a CUDA graph holding ``calls`` calls, warmed on its capture stream
    (cuBLAS and the allocator see that stream before capture): the decode benchmark's timer."""
    return time_replays(fn, calls=calls, reps=reps)


def cold_graph_time(fn: Callable, flush_bytes: int = 128 << 20, calls: int = 10) -> float:
    """Median ms per call with the L2 cache flushed before every call (a ``flush_bytes`` write,
    over twice the H100 / H200 L2), minus the flush alone: a layer's weights as they are in a
    real model, where the other layers evict them between two calls. ``graph_time`` replays
    the same call back to back, so weights that fit in L2 stay there."""
    buf = torch.empty(flush_bytes // 4, device="cuda", dtype=torch.float32)

    def both():
        buf.zero_()
        fn()

    return graph_time(both, calls=calls) - graph_time(buf.zero_, calls=calls)


def warm_up(seconds: float, device: str = "cuda") -> None:
    """Keep the GPU busy so that clocks have ramped before timing (no-op on the CPU)."""
    if device == "cpu":
        return
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    t0 = time.time()
    while time.time() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def make_idx(dist: str, t: int, n: int, p: int, device: str) -> torch.Tensor:
    """``[t, n]`` row ids in ``[0, p)``: uniform, or skewed (``u^4`` puts ~31 % of picks on 1 %
    of the rows; a multiplicative hash scatters them across the table)."""
    if dist == "uniform":
        return torch.randint(0, p, (t, n), device=device)
    hot = (torch.rand(t, n, device=device) ** 4 * p).long()
    return (hot * 2654435761) % p
