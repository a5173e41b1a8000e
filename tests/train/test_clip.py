"""Gradient clipping modes (train.grad_clip_mode): which norm clips which parameters."""

import math

import pytest
import torch

from ultramem.errors import ConfigError
from ultramem.model.transformer import Transformer
from ultramem.resolve import load_config
from ultramem.train.clip import clip_gradients
from ultramem.train.optim import build_param_groups


def _model_with_grads(seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config(preset="tiny-ultramem", overrides=["model.dropout=0"])
    model = Transformer.build(cfg.model)
    x = torch.randint(0, cfg.model.vocab_size, (2, 32))
    out = model(x, x)
    (out.loss * 50).backward()  # large enough that every part exceeds the threshold below
    groups = build_param_groups(model, cfg.train)
    return model, groups


def _grads(groups, names):
    return [p.grad.clone() for g in groups if g.name in names for p in g.params if p.grad is not None]


def _norm(ts):
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in ts))


def test_global_matches_torch_clip_grad_norm():
    model, groups = _model_with_grads()
    ref_model, _ = _model_with_grads()
    ref = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05)
    norms = clip_gradients(groups, "global", 0.05)
    assert norms["grad_norm"] == pytest.approx(float(ref), rel=1e-4)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_norms_are_reported_per_part_before_clipping():
    _, groups = _model_with_grads()
    dense = _grads(groups, ("decay", "no_decay"))
    values = _grads(groups, ("ultramem_values",))
    norms = clip_gradients(groups, "global", 0.0)  # measure only
    assert norms["grad_norm/dense"] == pytest.approx(_norm(dense), rel=1e-4)
    assert norms["grad_norm/ultramem_values"] == pytest.approx(_norm(values), rel=1e-4)
    assert norms["grad_norm"] == pytest.approx(math.hypot(_norm(dense), _norm(values)), rel=1e-4)
    assert _norm(_grads(groups, ("decay", "no_decay"))) == pytest.approx(_norm(dense))  # untouched


def test_exclude_values_clips_dense_on_its_own_norm_and_leaves_values():
    _, groups = _model_with_grads()
    values = _grads(groups, ("ultramem_values",))
    clip = 0.5 * _norm(_grads(groups, ("decay", "no_decay")))
    clip_gradients(groups, "exclude_values", clip)
    assert _norm(_grads(groups, ("decay", "no_decay"))) == pytest.approx(clip, rel=1e-4)
    for a, b in zip(values, _grads(groups, ("ultramem_values",))):
        torch.testing.assert_close(a, b)


def test_per_group_clips_each_part_to_the_threshold():
    _, groups = _model_with_grads()
    clip = 0.5 * min(_norm(_grads(groups, ("decay", "no_decay"))), _norm(_grads(groups, ("ultramem_values",))))
    clip_gradients(groups, "per_group", clip)
    assert _norm(_grads(groups, ("decay", "no_decay"))) == pytest.approx(clip, rel=1e-4)
    assert _norm(_grads(groups, ("ultramem_values",))) == pytest.approx(clip, rel=1e-4)


def test_bad_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="grad_clip_mode"):
        load_config(preset="tiny-dense", overrides=["train.grad_clip_mode=values"]).validate()
