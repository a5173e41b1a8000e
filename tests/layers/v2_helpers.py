"""Shared by the UltraMemV2 layer tests: small sizes and the model's way of building layers on
one pool."""

import torch

from ultramem.layers.registry import ShapeContext
from ultramem.layers.ultramem_v2 import UltraMemV2Config

D = 32
SMALL = dict(knum=8, key_dim=16, heads=1, topk=8, value_dim=12, pre_value_dim=6, calib_samples=128)


def build_all(n_mem=3, n_layers=3, seed=0, shape_kw=None, **kw):
    """Build ``n_mem`` V2 layers on one pool the way the model does (meta, to_empty, init)."""
    cfg = UltraMemV2Config(**{**SMALL, **kw})
    base = ShapeContext(d_model=D, n_layers=n_layers, n_mem_layers=n_mem, **(shape_kw or {}))
    cfg.validate(base, "model.memory")
    torch.manual_seed(seed)
    with torch.device("meta"):
        pool = cfg.build_shared(base)
        layers = [cfg.build(ShapeContext(**{**base.__dict__, "mem_index": i}), pool) for i in range(n_mem)]
    pool.to_empty(device="cpu")
    for layer in layers:
        layer.to_empty(device="cpu")
        layer.__dict__["pool"] = pool
    for layer in layers:
        layer.init_weights()
    pool.init_weights()
    return cfg, pool, layers
