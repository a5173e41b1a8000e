"""Faithfulness switches from the cross-check against the authors' code (issue 13):
UltraMemV2 address shuffle and weight decay on the value tables (v1 and V2)."""

import pytest
import torch
from v2_helpers import D, build_all

from ultramem.errors import ConfigError
from ultramem.layers.registry import ShapeContext
from ultramem.model.transformer import Transformer
from ultramem.resolve import load_config
from ultramem.train.optim import build_param_groups


def test_v2_shuffle_off_by_default_keeps_the_contiguous_map():
    _, _, layers = build_all(expansion=4)
    layer = layers[1]
    assert layer.perm is None and "perm" not in layer.state_dict()
    addr = torch.arange(layer.window * 3).view(3, -1)
    local, _ = layer.pool_rows_for(addr)
    assert torch.equal(local, addr % layer.window)


def test_v2_shuffle_permutes_addresses_before_the_window():
    cfg, _, layers = build_all(expansion=4, address_shuffle=True)
    layer = layers[1]
    n2 = cfg.keys_per_side(ShapeContext(d_model=D, n_layers=3, n_mem_layers=3)) ** 2
    assert layer.perm.dtype == torch.int32 and "perm" in layer.state_dict()
    assert torch.equal(layer.perm.long().sort().values, torch.arange(n2))  # a permutation
    addr = torch.randint(0, n2, (5, 16))
    local, rows = layer.pool_rows_for(addr)
    want = layer.perm.long()[addr] % layer.window
    assert torch.equal(local, want)
    assert torch.equal(rows, (want + layer.ring_offset) % layer.pool_rows)
    # addresses one window apart share a row without the shuffle; with it, most do not
    a = torch.arange(layer.window)
    same = (layer.pool_rows_for(a)[0] == layer.pool_rows_for(a + layer.window)[0]).float().mean()
    assert same < 0.2
    assert not torch.equal(layers[0].perm, layers[2].perm)  # each layer draws its own


def test_v2_shuffle_forward_runs_and_differs():
    torch.manual_seed(1)
    x = torch.randn(2, 8, D)
    outs = []
    for shuffle in (False, True):
        _, _, layers = build_all(seed=0, expansion=4, address_shuffle=shuffle)
        with torch.no_grad():
            outs.append(layers[0](x))
    assert outs[1].isfinite().all() and not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("preset,group", [("tiny-ultramem", "ultramem_values"), ("tiny-ultramem-v2", "ultramem_v2_values")])
def test_value_weight_decay_reaches_the_optimiser_group(preset, group):
    for decay in (0.0, 0.1):
        cfg = load_config(preset=preset, overrides=[f"model.memory.value_weight_decay={decay}"])
        groups = {g.name: g for g in build_param_groups(Transformer.build(cfg.model), cfg.train)}
        assert groups[group].weight_decay == decay


def test_bad_switch_values_are_config_errors():
    with pytest.raises(ConfigError, match="value_weight_decay"):
        load_config(preset="tiny-ultramem", overrides=["model.memory.value_weight_decay=-1"]).validate()
    with pytest.raises(ConfigError, match="value_weight_decay"):
        load_config(preset="tiny-ultramem-v2", overrides=["model.memory.value_weight_decay=-0.1"]).validate()
