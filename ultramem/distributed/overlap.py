"""Run each memory layer of a span ``i:j`` on a side stream, overlapping its lookup's
communication with blocks ``i+1..j`` (docs/distributed.md §4).

The host model computes a span's memory output from block i's normalised FFN input and adds
it at block j (math.md §1). :func:`overlap_memory` wraps each memory layer's ``forward`` so that it
is enqueued on a side stream (after the default stream's pending work, which produced its
input) and records an event; a forward hook on block j (``model.blocks[j - 1]``, run after
block j's compute, before the host adds the span's output) makes the default stream wait for
that event. The layers' FSDP units keep their parameters unsharded
until backward (``reshard_after_forward=False``): freeing them when the wrapped forward
returns would race with the side stream still reading them. Between the two, the default stream runs blocks
``i+1..j`` while the side stream runs the retrieval and the collectives of the sharded
lookup. Autograd runs each backward op on the stream of its forward op and synchronises
across streams itself, so the backward overlaps the same way.

Spans with ``i == j`` gain nothing and are left alone. On devices without streams (CPU) this
is a no-op. Row-wise lookups exchange split sizes through the host (``tolist``), which stalls
the CPU until the side stream reaches that point; column-wise lookups have no host sync.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _wrap_forward(layer: nn.Module, side: torch.cuda.Stream, events: dict[int, torch.cuda.Event], n: int) -> None:
    inner = layer.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        main = torch.cuda.current_stream(x.device)
        side.wait_stream(main)  # x (and the parameters' all-gathers) are ready
        with torch.cuda.stream(side):
            y = inner(x, *args, **kwargs)
            ev = torch.cuda.Event()
            ev.record(side)
        y.record_stream(main)  # y is freed only after the default stream's last use
        x.record_stream(side)
        events[n] = ev
        return y

    layer.forward = forward


def overlap_memory(model: nn.Module) -> int:
    """Install the side-stream wrappers on ``model`` (built, on its device; after
    :func:`~ultramem.distributed.parallelize.parallelize`). Returns how many layers overlap."""
    device = next(model.parameters()).device
    spans = model.wiring.spans
    if device.type != "cuda" or not spans:
        return 0
    side = torch.cuda.Stream(device)
    events: dict[int, torch.cuda.Event] = {}
    waits: dict[int, list[int]] = {}
    for n, span in enumerate(spans):
        if span.dst > span.src:
            _wrap_forward(model.memory[n], side, events, n)
            waits.setdefault(span.dst, []).append(n)
    for dst, layers in waits.items():
        def wait(_module: nn.Module, _args: Any, _out: Any, layers: list[int] = layers) -> None:
            main = torch.cuda.current_stream(device)
            for n in layers:
                if n in events:
                    main.wait_event(events.pop(n))

        model.blocks[dst - 1].register_forward_hook(wait)
    return sum(len(v) for v in waits.values())
