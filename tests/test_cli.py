import json

from ultramem.accounting import count
from ultramem.cli import main
from ultramem.presets import get_preset


def test_info_json(capsys):
    assert main(["info", "--preset", "dense-151m", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    c = count(get_preset("dense-151m").model)
    assert out == {"preset": "dense-151m", "params": c.params, "active_params": c.active_params,
                   "flops_per_token": c.flops_per_token}


def test_info_list_and_table(capsys):
    assert main(["info", "--list"]) == 0
    assert "moe-151m-2in32" in capsys.readouterr().out
    assert main(["info", "--preset", "pkm-151m-x12"]) == 0
    assert "published params" in capsys.readouterr().out


def test_info_bad_preset_and_override(capsys):
    assert main(["info", "--preset", "dense-151"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert main(["info", "--preset", "dense-151m", "model.d_modl=3"]) == 2
    assert "d_model" in capsys.readouterr().err
