"""Switches of the UltraMem layer added for the quality study (issue 13): the authors' init
and the branch-scale metric."""

import pytest
import torch

from ultramem.errors import ConfigError
from ultramem.layers.registry import ShapeContext
from ultramem.layers.ultramem import UltraMemConfig

SHAPE = ShapeContext(d_model=64, n_layers=12, n_mem_layers=1)
SMALL = dict(knum=32, key_dim=32, heads=2, topk=8, value_dim=32, expansion=4, calib_samples=128)


def build(**kw):
    cfg = UltraMemConfig(**{**SMALL, **kw})
    cfg.validate(SHAPE, "model.memory")
    with torch.device("meta"):
        layer = cfg.build(SHAPE)
    layer.to_empty(device="cpu")
    layer.init_weights()
    return layer


def test_authors_init_sets_the_released_codes_scales():
    layer = build(init="authors")
    k, r = 32, layer.retrieval
    assert layer.values.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.out_proj.weight.std().item() == pytest.approx((4 * 32) ** -0.5, rel=0.05)
    assert r.query_proj.weight.std().item() == pytest.approx(k**-0.5, rel=0.05)
    for w in r.gains():
        torch.testing.assert_close(w, torch.full_like(w, k**-0.33))
    cores = r.tucker.cores
    assert 0.0 <= cores.min().item() and cores.max().item() <= 1.0 and cores.std().item() > 0.1
    u, v = r.tucker.u, r.tucker.v  # refreshed from the new cores, not left at zero
    svd = torch.linalg.svd(cores.sum(0))
    assert abs(torch.dot(u, svd.U[:, 0]).item()) == pytest.approx(1.0, abs=1e-5)
    assert abs(torch.dot(v, svd.Vh[0]).item()) == pytest.approx(1.0, abs=1e-5)


def test_authors_init_starts_the_branch_smaller_than_appendix_a():
    x = torch.randn(1, 256, 64)
    stds = {}
    for init in ("improved", "authors"):
        torch.manual_seed(0)
        layer = build(init=init)
        with torch.no_grad():
            stds[init] = layer(x).std().item()
    assert stds["improved"] == pytest.approx((2 * 12) ** -0.5, rel=0.25)  # Appendix A: 1/sqrt(2L)
    assert stds["authors"] < 0.6 * stds["improved"]


def test_out_std_metric_is_the_branch_output_std():
    torch.manual_seed(0)
    layer = build()
    layer.track_metrics = True
    x = torch.randn(1, 64, 64)
    with torch.no_grad():
        y = layer(x)
    _, metrics = layer.pop_aux()
    assert float(metrics["out_std"]) == pytest.approx(y.std().item(), rel=1e-5)


def test_unknown_init_lists_authors():
    with pytest.raises(ConfigError, match="'authors'"):
        UltraMemConfig(**{**SMALL, "init": "olmo"}).validate(SHAPE, "model.memory")
