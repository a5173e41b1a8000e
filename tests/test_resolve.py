"""load_config: dataclass defaults < preset < config file < dotted overrides."""

import json

import pytest

from ultramem.config import Config
from ultramem.errors import ConfigError
from ultramem.layers.pkm import PKMConfig
from ultramem.layers.ultramem import UltraMemConfig
from ultramem.resolve import load_config


def test_config_file_overlays_the_preset():
    """The bug this guards: a file used to replace the preset (no memory, d_model 1024)."""
    preset = load_config("tiny-pkm")
    cfg = load_config("tiny-pkm", config_file={"train": {"lr": 1e-3}})
    assert cfg.train.lr == 1e-3 and preset.train.lr != 1e-3
    assert cfg.model.d_model == preset.model.d_model == 128
    assert isinstance(cfg.model.memory, PKMConfig) and cfg.model.memory == preset.model.memory
    assert {**cfg.to_dict(), "train": None} == {**preset.to_dict(), "train": None}


def test_whole_precedence_chain(tmp_path):
    defaults, preset = Config(), load_config("tiny-pkm")
    file = {"model": {"n_layers": 3, "memory": {"topk": 4}}, "train": {"lr": 1e-3, "max_steps": 7}}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(file))
    cfg = load_config("tiny-pkm", config_file=path, overrides=["train.lr=2e-3", "model.memory.heads=1"])
    assert cfg.train.beta2 == defaults.train.beta2 and preset.train.beta2 == defaults.train.beta2  # default
    assert cfg.model.d_model == preset.model.d_model != defaults.model.d_model  # preset over default
    assert cfg.model.memory.n_keys == preset.model.memory.n_keys == 64  # preset, inside a layer config
    assert (cfg.model.n_layers, cfg.model.memory.topk, cfg.train.max_steps) == (3, 4, 7)  # file over preset
    assert (cfg.train.lr, cfg.model.memory.heads) == (2e-3, 1)  # override over file
    assert load_config("tiny-pkm", config_file=file).to_dict() == load_config("tiny-pkm", config_file=path).to_dict()


def test_layer_type_in_a_file():
    same = load_config("tiny-pkm", config_file={"model": {"memory": {"type": "pkm", "topk": 4}}})
    assert isinstance(same.model.memory, PKMConfig) and (same.model.memory.topk, same.model.memory.n_keys) == (4, 64)
    other = load_config("tiny-pkm", config_file={"model": {"memory": {"type": "ultramem", "placement": "2:3"}}})
    assert other.model.memory == UltraMemConfig(placement="2:3")  # a new type starts from its defaults
    assert load_config("tiny-pkm", config_file={"model": {"memory": None}}).model.memory is None
    added = load_config("tiny-dense", config_file={"model": {"memory": {"type": "pkm", "n_keys": 16, "topk": 4,
                                                                        "key_dim": 16, "placement": "2:2"}}})
    assert added.model.memory == PKMConfig(n_keys=16, topk=4, key_dim=16, placement="2:2")


def test_a_resolved_config_file_wins_whole():
    """A saved run config names every field, so it gives back exactly that config over any preset."""
    saved = load_config("tiny-ultramem", overrides=["model.d_model=64"]).to_dict()
    assert load_config("tiny-moe", config_file=saved).to_dict() == saved
    assert load_config(config_file=saved).to_dict() == saved


def test_bad_config_file_fields():
    with pytest.raises(ConfigError, match=r"unknown config field 'train.lrr'; did you mean 'train.lr'"):
        load_config("tiny-pkm", config_file={"train": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match=r"did you mean 'model.memory.topk'"):
        load_config("tiny-pkm", config_file={"model": {"memory": {"top_k": 4}}})
    with pytest.raises(ConfigError, match=r"model must be a JSON object"):
        load_config("tiny-pkm", config_file={"model": 3})
    with pytest.raises(ConfigError, match=r"model.memory must be a JSON object with a 'type'"):
        load_config("tiny-pkm", config_file={"model": {"memory": "pkm"}})
    with pytest.raises(ConfigError, match=r"train.lr='fast' must be a number"):
        load_config("tiny-pkm", config_file={"train": {"lr": "fast"}})
