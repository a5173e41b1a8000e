"""Layer configs and the registry that maps a ``type`` name to a config class.

Every sparse part of a block (math.md §1: ``mlp``, ``moe``, ``pkm``, ``memory_plus``, ``ultramem``,
``ultramem_v2``) is a :class:`LayerConfig` subclass decorated with :func:`register_layer`. The
model never branches on type names: it calls ``cfg.build(ctx)`` and the accounting calls
``cfg.num_params(shape)`` etc. Adding a layer type touches no model code.

Two roles, one base class each:
- :class:`LayerConfig` (role ``"ffn"``): the per-block feed-forward (``model.ffn``), one per block.
- :class:`MemoryLayerConfig` (role ``"memory"``): memory layers (``model.memory``), which own
  ``placement`` and ``replace_ffn`` (math.md §1; wired by :func:`ultramem.placement.plan_wiring`).

This module sits at the bottom of the import graph (it imports only :mod:`ultramem.errors`):
layer modules import it and register into it; :mod:`ultramem.layers` imports every built-in
layer module, so importing that package fills the registry.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ultramem.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from ultramem.layers.base import SparseLayer

_REGISTRY: dict[str, type[LayerConfig]] = {}


@dataclass(frozen=True)
class ShapeContext:
    """What a layer config needs to know about its host to size itself (no weights)."""

    d_model: int
    n_layers: int  # transformer blocks (L in math.md §3.9)
    n_mem_layers: int = 0  # memory layers in the model (for shared pools and init)
    mem_index: int = 0  # which memory layer this is (0-based, in placement order)
    block_index: int = 0  # 1-based block the layer reads from
    ffn_hidden: int = 0  # the host FFN's inner dim (V2 init equates to it)
    ffn_gated: bool = False  # host FFN is SwiGLU


@dataclass
class LayerConfig:
    """Base of every layer config (role ``"ffn"``). Subclasses are dataclasses with defaults for
    every field."""

    type: ClassVar[str] = ""  # set by register_layer
    role: ClassVar[str] = "ffn"  # "ffn" | "memory" (MemoryLayerConfig)

    # ---- building -------------------------------------------------------------------------
    def build(self, shape: ShapeContext, shared: nn.Module | None = None) -> SparseLayer:
        raise NotImplementedError

    def build_shared(self, shape: ShapeContext) -> nn.Module | None:
        """Parameters shared by all layers of this config (a value pool), built once per model."""
        return None

    # ---- accounting (math.md §1 rules; no weights are allocated) -----------------------------
    def num_params(self, shape: ShapeContext) -> int:
        """Parameters owned by one layer (excluding what ``build_shared`` owns)."""
        raise NotImplementedError

    def shared_num_params(self, shape: ShapeContext) -> int:
        """Parameters of the shared module, counted once per model."""
        return 0

    def active_params(self, shape: ShapeContext) -> int:
        """Parameters one token touches in this layer (shared pool rows included)."""
        raise NotImplementedError

    def flops_per_token(self, shape: ShapeContext) -> int:
        """2 x multiply-accumulates of one token's forward pass through this layer."""
        raise NotImplementedError

    def validate(self, shape: ShapeContext, where: str) -> None:
        """Raise ConfigError naming ``where.field``, the value and what is allowed."""

    def ffn_shape(self) -> tuple[int, bool]:
        """``(inner dim, gated)`` of this layer as a block's FFN, for memory layers that size
        themselves against the host FFN (``ShapeContext.ffn_hidden`` / ``ffn_gated``, the V2
        init of math.md §4.5); ``(0, False)`` when it has no such width."""
        return 0, False


@dataclass
class MemoryLayerConfig(LayerConfig):
    """Base of every memory-layer config (role ``"memory"``): where its layers go."""

    role: ClassVar[str] = "memory"

    placement: str = "6:6"  # spans "i:j[/i:j...]" or "full" (math.md §1; ultramem.placement)
    replace_ffn: bool = False  # True: each i:i layer replaces block i's FFN (the original PKM)


def register_layer(name: str) -> Callable[[type[LayerConfig]], type[LayerConfig]]:
    """Class decorator: register a LayerConfig subclass under ``name`` (its role comes from its
    base class: :class:`MemoryLayerConfig` or :class:`LayerConfig`)."""

    def wrap(cls: type[LayerConfig]) -> type[LayerConfig]:
        if name in _REGISTRY:
            raise ValueError(f"layer type {name!r} is registered twice")
        cls.type = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def layer_types(role: str | None = None) -> list[str]:
    """Registered type names (of one role, if given), sorted."""
    return sorted(n for n, c in _REGISTRY.items() if role is None or c.role == role)


def layer_config_class(name: str, where: str = "type") -> type[LayerConfig]:
    """The config class registered as ``name``, or a ConfigError naming ``where``."""
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{where}={name!r} is not a layer type{hint} (types: {layer_types()})")
    return _REGISTRY[name]
