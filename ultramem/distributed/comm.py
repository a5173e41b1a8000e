"""Differentiable collectives over one process group, and a log of the bytes each one sends.

Each collective is an autograd function whose backward is the transposed collective
(all-to-all <-> all-to-all with the splits swapped, all-gather <-> reduce-scatter, all-reduce
<-> all-reduce), so a sharded op composed of them is differentiable end to end. Plain
``torch.distributed`` calls on plain tensors: gloo on CPU, NCCL on GPU, nothing device-specific.

Bytes: every call adds ``(name, phase, bytes)`` to each active :class:`CommLog` -- the bytes
this rank *sends to other ranks* (its own chunk stays local and is not counted):

- all-to-all: the rows sent to the other ranks times the row size;
- all-gather of ``x`` over ``M`` ranks: ``(M - 1) * x.nbytes`` (each rank's chunk reaches M - 1 others);
- reduce-scatter of ``x`` (``M`` equal chunks): ``(M - 1) / M * x.nbytes``;
- all-reduce of ``x``: ``2 (M - 1) / M * x.nbytes`` (ring: a reduce-scatter then an all-gather).

``docs/distributed.md`` derives the per-layer totals from these; the tests check the log
against :mod:`ultramem.distributed.volume`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_ACTIVE: list[CommLog] = []


@dataclass
class CommLog:
    """Bytes sent by this rank, keyed by ``(collective name, "forward" | "backward")``."""

    bytes: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def add(self, name: str, phase: str, nbytes: float) -> None:
        self.bytes[(name, phase)] += nbytes
        self.calls[(name, phase)] += 1

    def total(self, phase: str | None = None) -> float:
        return sum(b for (_, ph), b in self.bytes.items() if phase is None or ph == phase)


@contextlib.contextmanager
def record_comm() -> Iterator[CommLog]:
    """``with record_comm() as log:`` -- every collective of this module inside is logged."""
    log = CommLog()
    _ACTIVE.append(log)
    try:
        yield log
    finally:
        _ACTIVE.remove(log)


def _note(name: str, phase: str, nbytes: float) -> None:
    for log in _ACTIVE:
        log.add(name, phase, nbytes)


def _row_bytes(x: torch.Tensor) -> int:
    return x[0].numel() * x.element_size() if x.shape[0] else 0


# ---- one autograd function for every collective ------------------------------------------------
Collective = Callable[[torch.Tensor, str, str], torch.Tensor]  # (x, name, phase) -> result


class _Differentiable(torch.autograd.Function):
    """``forward(x)`` runs ``fwd``; ``backward(grad)`` runs ``bwd``, the transposed collective."""

    @staticmethod
    def forward(ctx, x, name, fwd, bwd):
        ctx.name, ctx.bwd = name, bwd
        return fwd(x, name, "forward")

    @staticmethod
    def backward(ctx, grad):
        return ctx.bwd(grad, ctx.name, "backward"), None, None, None


def _differentiable(x: torch.Tensor, name: str, fwd: Collective, bwd: Collective) -> torch.Tensor:
    if x.requires_grad:
        return _Differentiable.apply(x, name, fwd, bwd)
    return fwd(x, name, "forward")


# ---- all-to-all ---------------------------------------------------------------------------------
def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup,
         name: str, phase: str) -> torch.Tensor:
    """``x [sum(in_splits), ...]`` -> ``[sum(out_splits), ...]``: rows ``in_splits[r]`` go to rank r."""
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    me = dist.get_rank(group)
    _note(name, phase, (sum(in_splits) - in_splits[me]) * _row_bytes(x) if x.shape[0] else 0)
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup, name: str) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0 (see :func:`_a2a`); backward: the
    all-to-all with the splits swapped."""
    return _differentiable(x, name, lambda t, nm, ph: _a2a(t, out_splits, in_splits, group, nm, ph),
                           lambda t, nm, ph: _a2a(t, in_splits, out_splits, group, nm, ph))


def exchange_counts(counts: torch.Tensor, group: dist.ProcessGroup, name: str) -> torch.Tensor:
    """``counts [M, c]`` int64 (row r: what this rank tells rank r) -> ``[M, c]`` received."""
    m = dist.get_world_size(group)
    return _a2a(counts, [1] * m, [1] * m, group, name, "forward")


# ---- all-gather / reduce-scatter ----------------------------------------------------------------
def _gather(x: torch.Tensor, group: dist.ProcessGroup, name: str, phase: str) -> torch.Tensor:
    m = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty((m * x.shape[0], *x.shape[1:]))
    _note(name, phase, (m - 1) * x.numel() * x.element_size())
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup, name: str, phase: str) -> torch.Tensor:
    """Sum over ranks of ``x [M * T, ...]``, rank r keeping rows ``[r T, (r + 1) T)``. An
    all-to-all of the chunks then a local sum (gloo has no reduce-scatter); same bytes sent."""
    m = dist.get_world_size(group)
    t = x.shape[0] // m
    got = _a2a(x, [t] * m, [t] * m, group, name, phase)
    return got.view(m, t, *x.shape[1:]).sum(0)


def all_gather(x: torch.Tensor, group: dist.ProcessGroup, name: str) -> torch.Tensor:
    """Differentiable all-gather along dim 0: ``[T, ...]`` -> ``[M * T, ...]`` (rank order);
    every rank must pass the same shape. Backward: the reduce-scatter."""
    return _differentiable(x, name, lambda t, nm, ph: _gather(t, group, nm, ph),
                           lambda t, nm, ph: _reduce_scatter(t, group, nm, ph))


# ---- all-reduce ---------------------------------------------------------------------------------
def _reduce(x: torch.Tensor, group: dist.ProcessGroup, name: str, phase: str) -> torch.Tensor:
    m = dist.get_world_size(group)
    out = x.contiguous().clone()
    _note(name, phase, 2 * (m - 1) / m * out.numel() * out.element_size())
    dist.all_reduce(out, group=group)
    return out


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup, name: str) -> torch.Tensor:
    """Differentiable sum over the ranks of ``group`` (out of place). Backward: the same sum
    (every rank uses the sum, so d loss / d x on each rank is the sum of those uses)."""
    fn = lambda t, nm, ph: _reduce(t, group, nm, ph)  # noqa: E731
    return _differentiable(x, name, fn, fn)
