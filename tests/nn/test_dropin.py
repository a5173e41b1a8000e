"""Drop-in layers (ultramem.nn): the same modules as ultramem's own, usable in any model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from ultramem.errors import ConfigError
from ultramem.layers.registry import ShapeContext
from ultramem.nn import (
    PKM,
    MemoryPlus,
    UltraMem,
    UltraMemV2,
    after_optimizer_step,
    aux_loss,
    param_groups,
    set_lr,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CLASSES = (UltraMem, UltraMemV2, PKM, MemoryPlus)


def _small(cls):
    return cls(dim=32, n_values=16**2, topk=4, heads=2, key_dim=16, host_layers=2)


@pytest.mark.parametrize("cls", CLASSES)
def test_forward_shape_and_gradients(cls):
    layer = _small(cls).train()
    x = torch.randn(2, 7, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.abs().sum() > 0
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad and p.numel() > 8)


@pytest.mark.parametrize("cls", CLASSES)
def test_is_the_core_layer(cls):
    """The wrapper builds exactly the registered config's module: same weights -> same output."""
    torch.manual_seed(0)
    drop = _small(cls).eval()
    shape = ShapeContext(d_model=32, n_layers=2, n_mem_layers=1, block_index=1, ffn_hidden=128)
    shared = drop.cfg.build_shared(shape)
    core = drop.cfg.build(shape, shared)
    core.load_state_dict(drop.layer.state_dict())
    if shared is not None:
        shared.load_state_dict(drop.shared.state_dict())
    core.eval()
    if hasattr(core, "init_buffers"):
        core.init_buffers()
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(core(x), drop(x), atol=0, rtol=0)
    assert type(core) is type(drop.layer)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ConfigError, match="did you mean 'knum'"):
        UltraMem(dim=32, knumm=8)
    with pytest.raises(ConfigError, match="positive square"):
        PKM(dim=32, n_values=1000)
    with pytest.raises(ConfigError, match="UltraMemV2.k=64"):
        UltraMemV2(dim=32, n_values=4**2, topk=64)
    with pytest.raises(ValueError, match=r"expected x \[B, S, 32\]"):
        _small(PKM)(torch.randn(4, 32))


@pytest.mark.parametrize("cls", (UltraMemV2, MemoryPlus))
def test_stack_shares_one_table(cls):
    layers = cls.stack(3, 32, n_values=8**2, topk=4, key_dim=16, host_layers=3)
    pool = layers[0].shared
    assert all(not hasattr(m, "shared") for m in layers[1:])
    params = list(layers.parameters())
    assert sum(p is next(iter(pool.parameters())) for p in params) == 1  # counted once
    x = torch.randn(1, 4, 32)
    outs = [m(x) for m in layers]
    assert not torch.allclose(outs[0], outs[1])
    with pytest.raises(ConfigError, match="no shared table"):
        UltraMem.stack(2, 32)


def test_param_groups_value_lr_rule_and_coverage():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), _small(UltraMem), _small(PKM))
    groups = {g["name"]: g for g in param_groups(model, base_lr=1e-3, weight_decay=0.1)}
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    um, pkm = groups["ultramem_values"], groups["pkm_values"]
    assert um["weight_decay"] == 0 and pkm["weight_decay"] == 0 and groups["decay"]["weight_decay"] == 0.1
    assert um["lr"] == pytest.approx(1e-2)  # x value_lr_mult 10 at step 0 (math.md §3.10)
    opt = torch.optim.AdamW(list(groups.values()))
    set_lr(opt, step=100, total_steps=100, schedule=0.5)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["ultramem_values"]["lr"] == pytest.approx(0.5e-3)  # decayed to x1
    assert by_name["pkm_values"]["lr"] == pytest.approx(1e-3)  # constant 1e-3, no schedule
    assert by_name["decay"]["lr"] == pytest.approx(0.5e-3)


def test_aux_loss_collected_once_and_tucker_refresh():
    layer = _small(UltraMem).train()  # aux_alpha 0.001 by default (math.md §3.7)
    model = torch.nn.Sequential(layer)
    layer(torch.randn(2, 4, 32))
    loss = aux_loss(model)
    assert loss.requires_grad and loss.item() >= 0
    assert aux_loss(model).item() == 0  # popped: a loss computed is a loss applied, once
    tucker = layer.layer.retrieval.tucker
    with torch.no_grad():
        tucker.cores.add_(torch.randn_like(tucker.cores))
    before = tucker.u.clone()
    after_optimizer_step(model)
    assert not torch.allclose(before, tucker.u)


def _example(name: str):
    """Load ``examples/<name>.py`` as ``python examples/<name>.py`` would (its folder on the path,
    for the shared ``byte_training`` loop)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _falls(losses: list[float]) -> bool:
    return sum(losses[-3:]) / 3 < losses[0] - 0.5


def test_nanogpt_example_trains():
    losses = _example("nanogpt_memory").main(steps=15)
    assert _falls(losses), losses


def test_hf_llama_example_trains():
    pytest.importorskip("transformers")
    mod = _example("hf_llama_memory")
    model = mod.build()
    assert isinstance(model.model.layers[1].mlp.memory, UltraMem)
    losses = mod.main(steps=15)
    assert _falls(losses), losses
