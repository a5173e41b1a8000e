"""The one contract every sparse layer follows.

``SparseLayer.forward(x, state=None) -> y`` with ``x, y: [B, S, D]`` (same shape).

Auxiliary losses and metrics -- the one mechanism
-------------------------------------------------
During ``forward`` a layer calls ``self.add_aux_loss(name, scalar)`` (already weighted: it is
added to the training loss as is) and, only when ``self.track_metrics`` is on,
``self.add_metric(name, value)``. The host model gathers both from every sparse layer after
its forward (``Transformer.forward`` returns them in ``ModelOutput``), and clears them, so a
loss computed is always a loss applied.

Optimiser hints
---------------
``param_group_hints()`` returns :class:`ParamGroupHint` entries naming the exact parameter
objects that need a special group (value tables: LR multiplier schedule, no weight decay).
The trainer builds groups from these hints and asserts every parameter lands in exactly one.

Hooks
-----
``init_weights()`` (re)initialises the layer (called after materialising from the meta
device); ``after_optimizer_step(step)`` runs once per optimiser step (e.g. the Tucker
rank-1 refresh, math.md §3.7).

Decode state
------------
``state`` is the layer's :class:`~ultramem.layers.state.LayerState` for step-by-step decoding
(e.g. the query convolution's rolling window, math.md §3.11), made once by ``new_state`` and
updated in place; ``None`` means a full-sequence forward. Layers that carry nothing between
decode calls keep the default ``new_state`` (``None``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ultramem.layers.state import LayerState


@dataclass
class ParamGroupHint:
    """A set of parameters that needs its own optimiser group.

    ``lr_multiplier(step, total_steps)`` scales the scheduled LR (math.md §3.10); ``lr`` (if set)
    replaces the base LR (PKM/Memory+: constant value LR 1e-3).
    """

    name: str
    params: list[nn.Parameter]
    weight_decay: float | None = None  # None: the trainer's default
    lr: float | None = None
    lr_multiplier: Callable[[int, int], float] | None = None
    constant_lr: bool = False  # True: ignore warmup/cosine (PKM's constant value LR)


class SparseLayer(nn.Module):
    """Base class of every ffn/memory layer: aux-loss and metric plumbing plus hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.track_metrics = False
        self._aux_losses: dict[str, torch.Tensor] = {}
        self._metrics: dict[str, torch.Tensor | float] = {}

    # ---- aux / metrics ---------------------------------------------------------------------
    def add_aux_loss(self, name: str, value: torch.Tensor) -> None:
        self._aux_losses[name] = self._aux_losses.get(name, 0) + value

    def add_metric(self, name: str, value: torch.Tensor | float) -> None:
        self._metrics[name] = value.detach() if isinstance(value, torch.Tensor) else value

    def pop_aux(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | float]]:
        aux, metrics = self._aux_losses, self._metrics
        self._aux_losses, self._metrics = {}, {}
        return aux, metrics

    # ---- hooks -----------------------------------------------------------------------------
    def param_group_hints(self) -> list[ParamGroupHint]:
        return []

    def init_weights(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        return None

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> LayerState | None:
        """Decode state for ``batch`` sequences, or ``None`` if the layer is stateless per token."""
        return None

    def forward(self, x: torch.Tensor, state: LayerState | None = None) -> torch.Tensor:
        raise NotImplementedError


def linear_init_(weight: torch.Tensor, std: float) -> None:
    nn.init.normal_(weight, mean=0.0, std=std)
