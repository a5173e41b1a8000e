"""Drop-in memory layers: ``y = layer(x)``, ``x, y: [B, S, D]``, for any PyTorch model.

Each class is a thin shell over one registered layer config (:mod:`ultramem.layers`): the
constructor's keywords are that config's fields (defaults: the papers' settings at a small
size, documented beside each field in the config class), the module inside is the very layer
ultramem's own transformer uses (Triton kernels where they can run, else the PyTorch
reference). Put a layer parallel to a block's FFN, reading the FFN's normalised input::

    mem = UltraMemV2(dim=768, n_values=512**2, topk=32)
    h = norm2(x); x = x + mlp(h) + mem(h)

``n_values`` (optional) sets the table size: ``knum`` (UltraMem, V2) or ``n_keys`` (PKM,
Memory+) is its square root. ``host_layers`` is the depth of the host model (the
initialisations of math.md §3.9 / §4.5 scale with it); ``ffn_hidden``/``ffn_gated`` describe its
FFN (UltraMemV2's init equates the memory's output variance to the FFN's).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, ClassVar

import torch
from torch import nn

from ultramem.errors import ConfigError
from ultramem.layers.base import SparseLayer
from ultramem.layers.memory_plus import MemoryPlusConfig
from ultramem.layers.pkm import PKMConfig
from ultramem.layers.registry import LayerConfig, ShapeContext
from ultramem.layers.ultramem import UltraMemConfig
from ultramem.layers.ultramem_v2 import UltraMemV2Config

_HOST_ONLY = ("placement", "replace_ffn")  # wiring fields of ultramem's own transformer


class _DropIn(nn.Module):
    config_class: ClassVar[type[LayerConfig]]
    table_field: ClassVar[str]  # the field n_values sets (its square root)

    def __init__(self, dim: int, *, n_values: int | None = None, host_layers: int = 12,
                 ffn_hidden: int = 0, ffn_gated: bool = False, device: torch.device | str | None = None,
                 _index: int = 0, _count: int = 1, _shared: nn.Module | None = None, **fields: Any) -> None:
        super().__init__()
        if _count == 1 and "share_ratio" in {f.name for f in dataclasses.fields(self.config_class)}:
            fields.setdefault("share_ratio", 1.0)  # one layer alone: its window is its whole table
        self.cfg = _config(type(self), n_values, fields)
        self.shape = ShapeContext(d_model=dim, n_layers=host_layers, n_mem_layers=_count, mem_index=_index,
                                  block_index=1, ffn_hidden=ffn_hidden or 4 * dim, ffn_gated=ffn_gated)
        self.cfg.validate(self.shape, type(self).__name__)
        owns = _shared is None
        shared = self.cfg.build_shared(self.shape) if owns else _shared
        if owns and shared is not None:
            self.shared = shared  # the value pool/table: a submodule of the first layer only
        self.layer: SparseLayer = self.cfg.build(self.shape, shared)
        if device is not None:
            self.to(device)
        with torch.no_grad():
            self.layer.init_weights()
            if owns and shared is not None and hasattr(shared, "init_weights"):
                shared.init_weights()  # after the layer: V2's pool init uses its calibration

    @classmethod
    def stack(cls, count: int, dim: int, **kwargs: Any) -> nn.ModuleList:
        """``count`` layers sharing one value pool/table (UltraMemV2: each its window of the
        ring, math.md §4.4; Memory+: one table). Layer 0 holds the shared parameters: insert all."""
        first = cls(dim, _index=0, _count=count, **kwargs)
        shared = getattr(first, "shared", None)
        if shared is None:
            raise ConfigError(f"{cls.__name__} has no shared table; build the layers one by one")
        others = [cls(dim, _index=i, _count=count, _shared=shared, **kwargs) for i in range(1, count)]
        return nn.ModuleList([first, *others])

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        """``x [B, S, D]`` -> ``[B, S, D]``; ``state``: a dict kept by the caller to decode token
        by token (UltraMem's query convolution keeps its window there)."""
        if x.dim() != 3 or x.shape[-1] != self.shape.d_model:
            raise ValueError(f"{type(self).__name__}: expected x [B, S, {self.shape.d_model}], got {tuple(x.shape)}")
        return self.layer(x, state)

    def extra_repr(self) -> str:
        return f"dim={self.shape.d_model}, type={self.cfg.type}"


def _config(cls: type[_DropIn], n_values: int | None, fields: dict[str, Any]) -> LayerConfig:
    names = [f.name for f in dataclasses.fields(cls.config_class) if f.name not in _HOST_ONLY]
    for key in fields:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{cls.__name__}: unknown argument {key!r}{hint} (valid: dim, n_values, "
                              f"host_layers, ffn_hidden, ffn_gated, device, {', '.join(names)})")
    if n_values is not None:
        root = math.isqrt(n_values) if n_values > 0 else 0
        if root * root != n_values or root == 0:
            raise ConfigError(f"{cls.__name__}: n_values={n_values} must be a positive square "
                              f"(product keys address N^2 values; e.g. {max(root, 1) ** 2})")
        if cls.table_field in fields:
            raise ConfigError(f"{cls.__name__}: give n_values or {cls.table_field}, not both")
        fields = {**fields, cls.table_field: root}
    return cls.config_class(**fields)


class UltraMem(_DropIn):
    """UltraMem (ICLR 2025; math.md §3): TDQKR, multi-core scoring, implicit value expansion, query
    conv; ``n_values = knum^2`` physical rows. Fields: :class:`ultramem.layers.ultramem.UltraMemConfig`."""

    config_class = UltraMemConfig
    table_field = "knum"


class UltraMemV2(_DropIn):
    """UltraMemV2 (math.md §4): PEER-style pre-values, one shared pool (``stack``), principled
    init; ``n_values = knum^2`` rows per layer. Fields: :class:`ultramem.layers.ultramem_v2.UltraMemV2Config`."""

    config_class = UltraMemV2Config
    table_field = "knum"


class PKM(_DropIn):
    """Product-key memory (Lample et al. 2019; math.md §2); ``n_values = n_keys^2``.
    Fields: :class:`ultramem.layers.pkm.PKMConfig`."""

    config_class = PKMConfig
    table_field = "n_keys"


class MemoryPlus(_DropIn):
    """Memory+ (Memory Layers at Scale; math.md §5): SiLU-gated output, one table shared by every
    layer (``stack``); ``n_values = n_keys^2``. Fields: :class:`ultramem.layers.memory_plus.MemoryPlusConfig`."""

    config_class = MemoryPlusConfig
    table_field = "n_keys"
