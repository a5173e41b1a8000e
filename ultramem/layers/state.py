"""Per-layer decode state (the typed replacement of the old ``state`` dict).

A layer that carries something from one decode call to the next (today: the causal query
convolution's rolling window, math.md §3.11) gets a :class:`LayerState` whose tensors are
allocated once, before the first call, and then updated in place, so a decode step can be
captured in a CUDA graph and replayed. ``None`` in place of a state means a full-sequence
forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerState:
    """``window [B, C, W]``: the last ``W`` inputs (channels first) a causal conv has seen, zeros
    before the first token. ``lengths [B]`` (set by the caller for one call, ``None``: every
    sequence has all ``S`` tokens of the call valid): right-padded ragged input, sequence ``b``
    has its first ``lengths[b]`` tokens valid, so the window must end at its last valid one."""

    window: torch.Tensor | None = None
    lengths: torch.Tensor | None = None

    def reset(self) -> None:
        if self.window is not None:
            self.window.zero_()

    def narrow(self, batch: int) -> LayerState:
        """The first ``batch`` sequences (views: writes go to this state)."""
        return LayerState(None if self.window is None else self.window[:batch], None)
