import json

import pytest

from ultramem.config import Config, apply_override
from ultramem.errors import ConfigError
from ultramem.layers.moe import MoEConfig
from ultramem.layers.pkm import PKMConfig
from ultramem.resolve import load_config


def test_dotted_overrides_types_and_nesting():
    cfg = load_config("tiny-dense", overrides=["model.d_model=64", "train.lr=1e-3", "model.ffn.hidden=96",
                                                "model.tie_embeddings=false", "model.n_kv_heads=2"])
    assert cfg.model.d_model == 64 and cfg.train.lr == 1e-3 and cfg.model.ffn.hidden == 96
    assert cfg.model.tie_embeddings is False and cfg.model.n_kv_heads == 2


def test_unknown_field_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown config field 'model.d_modle'; did you mean 'model.d_model'"):
        load_config("tiny-dense", overrides=["model.d_modle=64"])
    with pytest.raises(ConfigError, match=r"did you mean 'model.ffn.hidden'"):
        load_config("tiny-dense", overrides=["model.ffn.hiden=64"])


def test_switch_layer_type_keeps_shared_fields():
    cfg = load_config("tiny-dense", overrides=["model.ffn.type=moe", "model.ffn.n_experts=4"])
    assert isinstance(cfg.model.ffn, MoEConfig) and cfg.model.ffn.n_experts == 4
    assert cfg.model.ffn.hidden == 512  # kept from the MLP config
    cfg = load_config("tiny-dense", overrides=["model.memory=pkm", "model.memory.n_keys=16", "model.memory.topk=4",
                                                "model.memory.key_dim=16", "model.memory.placement=2:2"])
    assert isinstance(cfg.model.memory, PKMConfig) and cfg.model.memory.n_keys == 16
    assert load_config("tiny-pkm", overrides=["model.memory=none"]).model.memory is None


def test_unknown_layer_type_and_bad_values():
    with pytest.raises(ConfigError, match=r"model.ffn.type='mo'.*did you mean 'moe'"):
        load_config("tiny-dense", overrides=["model.ffn.type=mo"])
    with pytest.raises(ConfigError, match=r"model.d_model=.*must be an integer"):
        load_config("tiny-dense", overrides=["model.d_model=abc"])
    with pytest.raises(ConfigError, match=r"model.d_model=100 is not divisible by model.n_heads=3"):
        load_config("tiny-dense", overrides=["model.d_model=100", "model.n_heads=3"])
    with pytest.raises(ConfigError, match=r"model.ffn.top_k=9 exceeds model.ffn.n_experts=8"):
        load_config("tiny-moe", overrides=["model.ffn.top_k=9"])
    with pytest.raises(ConfigError, match=r"model.memory.topk=100 exceeds k\^2=64"):
        load_config("tiny-pkm", overrides=["model.memory.topk=100", "model.memory.k=8"])
    with pytest.raises(ConfigError, match=r"model.norm='batchnorm'; allowed"):
        load_config("tiny-dense", overrides=["model.norm=batchnorm"])
    with pytest.raises(ConfigError, match="is a memory layer"):
        load_config("tiny-dense", overrides=["model.ffn.type=pkm"])
    with pytest.raises(ConfigError, match="must look like"):
        apply_override(Config(), "model.d_model")


def test_save_load_roundtrip(tmp_path):
    for name in ("tiny-dense", "tiny-moe", "tiny-pkm", "tiny-memory-plus"):
        cfg = load_config(name)
        path = tmp_path / f"{name}.json"
        cfg.save(path)
        again = Config.load(path)
        assert again.to_dict() == cfg.to_dict()
        assert json.loads(path.read_text())["model"]["ffn"]["type"] in ("mlp", "moe")


def test_config_file_rejects_unknown_keys(tmp_path):
    d = load_config("tiny-dense").to_dict()
    d["train"]["learning_rate"] = 1.0
    path = tmp_path / "c.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(config_file=path)
