"""``import ultramem`` registers with the Auto classes, without importing transformers itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> dict:
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_ultramem_registers_lazily():
    res = _run("""
import json, sys
import ultramem
before = "transformers" in sys.modules
from transformers import AutoConfig, AutoModelForCausalLM
cfg = AutoConfig.for_model("ultramem", ultramem={"vocab_size": 97, "d_model": 32, "n_layers": 1, "n_heads": 2,
                                                   "max_seq_len": 16, "ffn": {"type": "mlp", "hidden": 64}})
model = AutoModelForCausalLM.from_config(cfg)
print(json.dumps({"before": before, "config": type(cfg).__module__, "model": type(model).__module__,
                  "hidden": cfg.hidden_size, "std": float(model.model.embed_tokens.weight.std())}))
""")
    assert res["before"] is False  # import ultramem did not import transformers
    assert res["config"] == "ultramem.hf.configuration_ultramem"
    assert res["model"] == "ultramem.hf.modeling_ultramem"
    assert res["hidden"] == 32
    assert 0.01 < res["std"] < 0.03  # initialised (init_std 0.02), not left empty


def test_registers_when_transformers_came_first():
    res = _run("""
import json
import transformers
import ultramem
from transformers import AutoConfig
print(json.dumps({"config": type(AutoConfig.for_model("ultramem")).__name__}))
""")
    assert res["config"] == "UltramemConfig"
