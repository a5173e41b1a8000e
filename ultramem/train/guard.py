"""Divergence guard: stop a run whose loss or gradient norm stops being finite, or whose loss
spikes, before the optimiser applies that step -- so no non-finite weight is ever saved and
keep-last rotation never replaces the last good checkpoint.

Checked every optimiser step, before ``optimizer.step()``:

- the training loss and the global gradient norm must be finite;
- with ``train.spike_factor = f > 0``: the loss must not exceed ``f`` times the mean of the
  last ``train.spike_window`` losses (checked once that many steps have been seen). Off by
  default: early training and LR warm-up legitimately jump around.
"""

from __future__ import annotations

import math
from collections import deque

from ultramem.errors import UltramemError


class DivergenceError(UltramemError, RuntimeError):
    """Training diverged; the message names the step, the value and the last good checkpoint."""


class DivergenceGuard:
    def __init__(self, spike_factor: float = 0.0, spike_window: int = 50) -> None:
        self.spike_factor, self.window = spike_factor, spike_window
        self.recent: deque[float] = deque(maxlen=max(1, spike_window))

    def check(self, loss: float, grad_norm: float) -> str | None:
        """What is wrong with this step (None when nothing); remembers a good step's loss."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"the gradient norm is {grad_norm} (loss {loss:.4f})"
        if self.spike_factor > 0 and len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                return (f"loss {loss:.4f} > train.spike_factor={self.spike_factor} x {mean:.4f}, the mean "
                        f"of the last {len(self.recent)} steps (raise train.spike_factor, or 0 = off)")
        self.recent.append(loss)
        return None


def diverged(step: int, problem: str, last_good: object) -> DivergenceError:
    return DivergenceError(
        f"training diverged at step {step}: {problem}; that step was not applied and nothing "
        f"non-finite was saved; last good checkpoint: {last_good or 'none'}. Lower train.lr, "
        f"keep train.grad_clip > 0, or check the data")
