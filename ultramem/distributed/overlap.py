"""Run each memory layer of a span ``i:j`` on a side stream, overlapping its lookup's
communication with blocks ``i+1..j`` (training; docs/distributed.md §4).

The host model launches a span's memory layer from block i's ``before_ffn`` hook (on block
i's normalised FFN input) and adds its output after block j (math.md §1). :func:`overlap_memory`
wraps each such layer's ``forward`` so that it is enqueued on a side stream (after the
default stream's pending work, which produced its input and, under FSDP2, waited for the
layer's parameter all-gather) and records an event; a forward hook on block j
(``model.blocks[j - 1]``, run after block j's compute, before the host adds the span's
output) makes the default stream wait for that event. Between the two, the default stream
runs the rest of block i and blocks ``i+1..j`` while the side stream runs the retrieval and
the collectives of the sharded lookup (NCCL orders a collective after the stream it is called
from). Autograd runs each backward op on the stream of its forward op and synchronises across
streams itself, so the backward overlaps the same way.

Memory: tensors made on one stream and used on the other are marked with ``record_stream``
(the output and every aux loss the layer leaves for the model to collect, and the input),
so the caching allocator never hands their memory to the other stream too early. The layers'
FSDP units keep their parameters unsharded until backward (``reshard_after_forward=False``,
:func:`~ultramem.distributed.parallelize.parallelize`): resharding when the wrapped forward
returns would free them while the side stream still reads them.

Streams are a small interface (:class:`Streams`): :class:`CudaStreams` on CUDA, and
:class:`HostStreams`, which runs everything in order on the host (no concurrency) and records
the schedule -- how the CPU tests check that the wrapped model computes exactly what the plain
one does and that each wait comes after block j and before the add. Spans with ``i == j`` gain
nothing and are left alone. Row-wise lookups exchange split sizes through the host
(``tolist``), which stalls the CPU until the side stream reaches that point; column-wise
lookups have no host sync.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


class Streams:
    """What the overlap needs of a device's streams (see :class:`CudaStreams`)."""

    def launch(self, n: int, x: torch.Tensor) -> contextlib.AbstractContextManager:
        """Context in which memory layer ``n``'s forward on ``x`` is enqueued."""
        raise NotImplementedError

    def done(self, n: int, tensors: list[torch.Tensor]) -> None:
        """Layer ``n``'s forward is enqueued; ``tensors`` (its outputs) are read by the default stream."""
        raise NotImplementedError

    def join(self, n: int) -> None:
        """The default stream waits for layer ``n`` (before its output is added)."""
        raise NotImplementedError


class CudaStreams(Streams):
    """One side CUDA stream for every overlapped layer; an event per launch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device)
        self.events: dict[int, torch.cuda.Event] = {}
        self._inputs: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def launch(self, n: int, x: torch.Tensor):
        self.side.wait_stream(torch.cuda.current_stream(self.device))  # x, parameters ready
        x.record_stream(self.side)  # made on the default stream, read on the side one
        with torch.cuda.stream(self.side):
            yield

    def done(self, n: int, tensors: list[torch.Tensor]) -> None:
        main = torch.cuda.current_stream(self.device)
        for t in tensors:
            t.record_stream(main)
        ev = torch.cuda.Event()
        ev.record(self.side)
        self.events[n] = ev

    def join(self, n: int) -> None:
        ev = self.events.pop(n, None)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)


class HostStreams(Streams):
    """No streams: each layer runs where it is called (as without overlap); ``trace`` records
    ``("launch" | "done" | "join", n)`` in order, for the tests."""

    def __init__(self) -> None:
        self.trace: list[tuple[str, int]] = []

    @contextlib.contextmanager
    def launch(self, n: int, x: torch.Tensor):
        self.trace.append(("launch", n))
        yield

    def done(self, n: int, tensors: list[torch.Tensor]) -> None:
        self.trace.append(("done", n))

    def join(self, n: int) -> None:
        self.trace.append(("join", n))


def _aux_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """Aux losses and metrics the layer's modules hold for the model to collect
    (``SparseLayer.pop_aux``, read on the default stream)."""
    return [v for m in layer.modules() for name in ("_aux_losses", "_metrics")
            for v in (getattr(m, name, None) or {}).values() if isinstance(v, torch.Tensor)]


def _wrap_forward(layer: nn.Module, streams: Streams, n: int) -> None:
    inner = layer.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with streams.launch(n, x):
            y = inner(x, *args, **kwargs)
        streams.done(n, [y, *_aux_tensors(layer)])
        return y

    layer.forward = forward


def overlap_memory(model: nn.Module, streams: Streams | None = None) -> int:
    """Install the side-stream wrappers on ``model`` (built, on its device; after
    :func:`~ultramem.distributed.parallelize.parallelize`). ``streams``: default
    :class:`CudaStreams` on a CUDA model, none (nothing installed) elsewhere; pass
    :class:`HostStreams` to run the same schedule on the host. Returns how many layers overlap."""
    device = next(model.parameters()).device
    if streams is None:
        if device.type != "cuda":
            return 0
        streams = CudaStreams(device)
    waits: dict[int, list[int]] = {}
    for n, span in enumerate(model.wiring.spans):
        if span.dst > span.src:
            _wrap_forward(model.memory[n], streams, n)
            waits.setdefault(span.dst, []).append(n)
    for dst, layers in waits.items():
        def join(_module: nn.Module, _args: Any, _out: Any, layers: list[int] = layers) -> None:
            for n in layers:
                streams.join(n)

        model.blocks[dst - 1].register_forward_hook(join)
    return sum(len(v) for v in waits.values())
