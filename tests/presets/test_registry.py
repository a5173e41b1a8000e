"""Preset sizes reproduce the published tables (math.md §6) and built models match the accounting."""

import pytest
import torch

from ultramem.accounting import count, embedding_params
from ultramem.model.transformer import Transformer
from ultramem.presets import get_preset_info, preset_names

PUBLISHED = [n for n in preset_names() if get_preset_info(n).published.params is not None]
TINY = [n for n in preset_names() if n.startswith("tiny-")]


def test_every_table_row_has_a_preset():
    names = set(preset_names())
    for n in ["dense-151m", "dense-680m", "dense-1.6b", "dense-6.5b", "moe-151m-2in32", "moe-680m-2in33",
              "moe-1.6b-2in34", "pkm-151m-x12", "pkm-680m-x12", "pkm-1.6b-x12", "olmoe-227m-1.2b", "olmoe-1b-7b"]:
        assert n in names


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_matches_published(name):
    info = get_preset_info(name)
    pub, model = info.published, info.make().model
    c, emb = count(model), embedding_params(model)
    params = c.params + (emb if pub.embedding_in_params else 0)
    assert abs(params / pub.params - 1) <= pub.params_tolerance, (name, params, pub.params)
    if pub.gflops is not None:
        assert abs(c.flops_per_token / 1e9 / pub.gflops - 1) <= pub.gflops_tolerance, (name, c.flops_per_token)
    if pub.active_params is not None:
        active = c.active_params + (emb if pub.embedding_in_active else 0)
        assert abs(active / pub.active_params - 1) <= pub.params_tolerance, (name, active)


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_are_tiny_and_built_count_equals_accounting(name):
    model_cfg = get_preset_info(name).make().model
    c = count(model_cfg)
    assert c.params <= 5_000_000
    model = Transformer.build(model_cfg)
    assert model.num_params() == c.params
    assert c.active_params <= c.params


def test_meta_build_does_not_allocate_large_presets():
    with torch.device("meta"):
        model = Transformer(get_preset_info("moe-151m-2in32").make().model)
    assert model.num_params() == count(model.cfg).params


def test_replace_ffn_drops_the_mlp_and_accounting_follows():
    from ultramem.resolve import load_config

    cfg = load_config("tiny-pkm", overrides=["model.memory.replace_ffn=true"])
    model = Transformer.build(cfg.model)
    assert model.blocks[1].ffn is None and model.blocks[0].ffn is not None
    assert model.num_params() == count(cfg.model).params
    assert count(cfg.model).params < count(load_config("tiny-pkm").model).params
