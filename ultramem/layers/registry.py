"""Layer configs and the registry that maps a ``type`` name to a config class.

Every sparse part of a block (SPEC §1: ``mlp``, ``moe``, ``pkm``, ``memory_plus``, ``ultramem``,
``ultramem_v2``) is a :class:`LayerConfig` subclass decorated with :func:`register_layer`. The
model never branches on type names: it calls ``cfg.build(ctx)`` and the accounting calls
``cfg.num_params(shape)`` etc. Adding a layer type touches no model code.

Two roles:
- ``"ffn"``: the per-block feed-forward (``model.ffn``), one per block.
- ``"memory"``: memory layers (``model.memory``), wired by ``placement`` (SPEC §1).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ultramem.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from ultramem.config import ModelConfig
    from ultramem.layers.base import SparseLayer

_REGISTRY: dict[str, type[LayerConfig]] = {}


@dataclass(frozen=True)
class ShapeContext:
    """What a layer config needs to know about its host to size itself (no weights)."""

    d_model: int
    n_layers: int  # transformer blocks (L in SPEC §3.9)
    n_mem_layers: int = 0  # memory layers in the model (for shared pools and init)
    mem_index: int = 0  # which memory layer this is (0-based, in placement order)
    block_index: int = 0  # 1-based block the layer reads from
    ffn_hidden: int = 0  # the host FFN's inner dim (V2 init equates to it)
    ffn_gated: bool = False  # host FFN is SwiGLU

    @classmethod
    def for_model(cls, m: ModelConfig, n_mem_layers: int = 0, **kw: Any) -> ShapeContext:
        return cls(
            d_model=m.d_model,
            n_layers=m.n_layers,
            n_mem_layers=n_mem_layers,
            ffn_hidden=getattr(m.ffn, "hidden", 0),
            ffn_gated=getattr(m.ffn, "activation", "") == "swiglu",
            **kw,
        )


@dataclass
class LayerConfig:
    """Base of every layer config. Subclasses are dataclasses with defaults for every field.

    A memory-role subclass must also have fields ``placement: str`` and ``replace_ffn: bool``.
    """

    type: ClassVar[str] = ""
    role: ClassVar[str] = "ffn"  # "ffn" | "memory"
    allows_overlapping_spans: ClassVar[bool] = False

    # ---- building -------------------------------------------------------------------------
    def build(self, shape: ShapeContext, shared: nn.Module | None = None) -> SparseLayer:
        raise NotImplementedError

    def build_shared(self, shape: ShapeContext) -> nn.Module | None:
        """Parameters shared by all layers of this config (a value pool), built once per model."""
        return None

    # ---- accounting (SPEC §1 rules; no weights are allocated) -----------------------------
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


def register_layer(name: str, role: str = "ffn"):
    """Class decorator: register a LayerConfig subclass under ``name``."""

    def wrap(cls: type[LayerConfig]) -> type[LayerConfig]:
        if name in _REGISTRY:
            raise ValueError(f"layer type {name!r} is registered twice")
        cls.type = name
        cls.role = role
        _REGISTRY[name] = cls
        return cls

    return wrap


def _ensure_loaded() -> None:
    import ultramem.layers  # noqa: F401,PLC0415  (registers every built-in layer)


def layer_types(role: str | None = None) -> list[str]:
    _ensure_loaded()
    return sorted(n for n, c in _REGISTRY.items() if role is None or c.role == role)


def layer_config_class(name: str, where: str = "type") -> type[LayerConfig]:
    _ensure_loaded()
    if name not in _REGISTRY:

        near = difflib.get_close_matches(name, list(_REGISTRY), n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{where}={name!r} is not a layer type{hint} (types: {layer_types()})")
    return _REGISTRY[name]
