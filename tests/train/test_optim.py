"""Optimiser groups: built from hints and types, every parameter in exactly one group."""

import pytest
import torch
from torch import nn

from ultramem.config import TrainConfig
from ultramem.layers.base import ParamGroupHint, SparseLayer
from ultramem.model.transformer import Transformer
from ultramem.presets import preset_names
from ultramem.resolve import load_config
from ultramem.train.optim import build_param_groups, check_coverage, lr_factor

TINY = [p for p in preset_names() if p.startswith("tiny-")]


@pytest.mark.parametrize("preset", TINY)
def test_every_parameter_in_exactly_one_group(preset):
    cfg = load_config(preset=preset)
    model = Transformer.build(cfg.model)
    groups = build_param_groups(model, cfg.train)
    ids = [id(p) for g in groups for p in g.params]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    by_name = {g.name: g for g in groups}
    assert by_name["decay"].weight_decay == cfg.train.weight_decay and by_name["no_decay"].weight_decay == 0
    assert all(p.ndim >= 2 for p in by_name["decay"].params)
    assert any(p is model.embed_tokens.weight for p in by_name["no_decay"].params)
    hinted = [h for layer in model.sparse_layers() for h in layer.param_group_hints()]
    for h in hinted:
        assert all(any(p is q for q in by_name[h.name].params) for p in h.params)


class _Bad(SparseLayer):
    def __init__(self, shared: nn.Parameter) -> None:
        super().__init__()
        self.w = shared

    def param_group_hints(self):
        return [ParamGroupHint(f"h{id(self)}", [self.w])]


def test_conflicting_hints_rejected():
    shared = nn.Parameter(torch.zeros(3, 3))
    model = nn.ModuleList([_Bad(shared), _Bad(shared)])
    with pytest.raises(AssertionError, match="hinted by both"):
        build_param_groups(model, TrainConfig())


def test_coverage_check_catches_a_missing_parameter():
    model = nn.Linear(3, 3)
    from ultramem.train.optim import GroupSpec

    with pytest.raises(AssertionError, match="in no optimiser group"):
        check_coverage(model, [GroupSpec("decay", [model.weight], 0.1, 1e-3)])


def test_schedule_warmup_then_cosine_to_min():
    cfg = TrainConfig(max_steps=100, warmup_frac=0.1, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) == pytest.approx(0.1, abs=1e-3)
    f = [lr_factor(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(f, f[1:]))


def test_set_lr_applies_hints():
    from ultramem.train.optim import GroupSpec, make_optimizer, set_lr

    cfg = TrainConfig(max_steps=10, warmup_frac=0.0, lr=1e-3)
    ps = [nn.Parameter(torch.zeros(2, 2)) for _ in range(3)]
    groups = [GroupSpec("decay", [ps[0]], 0.1, 1e-3),
              GroupSpec("values", [ps[1]], 0.0, 1e-3, lr_multiplier=lambda s, t: 10.0),
              GroupSpec("pkm_values", [ps[2]], 0.0, 1e-2, constant_lr=True)]
    opt = make_optimizer(groups, cfg, "cpu")
    set_lr(opt, groups, 5, cfg)
    f = lr_factor(5, cfg)
    assert [pg["lr"] for pg in opt.param_groups] == pytest.approx([1e-3 * f, 1e-2 * f, 1e-2])
    assert [pg["weight_decay"] for pg in opt.param_groups] == [0.1, 0.0, 0.0]
