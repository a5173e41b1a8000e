"""Sparse layers. Importing this package registers every built-in layer type."""

from ultramem.layers import memory_plus, mlp, moe, pkm, ultramem, ultramem_v2  # noqa: F401
from ultramem.layers.base import ParamGroupHint, SparseLayer
from ultramem.layers.registry import LayerConfig, ShapeContext, layer_types, register_layer

__all__ = ["LayerConfig", "ParamGroupHint", "ShapeContext", "SparseLayer", "layer_types", "register_layer"]
