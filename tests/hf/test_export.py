"""Export every layer type, load it in a fresh process without ultramem, compare with ultramem."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_helpers import PRESETS, hf_env, make_run, run_without_ultramem

from ultramem.errors import ConfigError
from ultramem.hf.export import export_run
from ultramem.inference.generate import generate
from ultramem.inference.load import load_run

pytest.importorskip("transformers")

PROMPT = "Fellow-Citizens of the Senate and of the House"
NEW = 10

CHILD = '''
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for name, d in json.loads(sys.argv[1] if len(sys.argv) > 1 else open("dirs.json").read()).items():
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
    backend = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".ultramem_backend"].BACKEND
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    gen = model.generate(ids, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
    out[name] = {"backend": backend, "ids": ids[0].tolist(), "logits": logits[0].tolist(),
                 "new": gen[0, ids.shape[1]:].tolist(), "eos": tok.eos_token_id}
open("result.json", "w").write(json.dumps(out))
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for preset in PRESETS:
        run = make_run(root / "runs" / preset, preset)
        dirs[preset] = str(export_run(run, root / "export" / preset))
    (root / "dirs.json").write_text(json.dumps(dirs))
    script = f"PROMPT = {PROMPT!r}\nNEW = {NEW}\n" + CHILD
    proc = run_without_ultramem(script, root, root / "hf_home")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, dirs, json.loads((root / "result.json").read_text())


@pytest.mark.parametrize("preset", PRESETS)
def test_logits_and_greedy_tokens_match_without_ultramem(exported, preset):
    root, dirs, result = exported
    res = result[preset]
    assert res["backend"] == "reference copy"  # ultramem really was not importable
    loaded = load_run(root / "runs" / preset)
    ids = torch.tensor([res["ids"]])
    assert ids.shape[1] == len(loaded.tokenizer.encode(PROMPT)) and res["eos"] == loaded.tokenizer.eot_id
    with torch.no_grad():
        ref = loaded.model(ids).logits[0]
    hf = torch.tensor(res["logits"])
    assert hf.shape == ref.shape
    torch.testing.assert_close(hf, ref, atol=1e-4, rtol=0)
    # greedy with ultramem's own KV-cache generate (no stop token: min_new_tokens in the child)
    new = generate(loaded.model, [res["ids"]], NEW, temperature=0, stop=[]).ids[0]
    assert res["new"] == new


def test_directory_contents_and_card(exported):
    root, dirs, _ = exported
    d = root / "export" / "tiny-ultramem-v2"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "ultramem" and set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert cfg["ultramem"]["memory"]["type"] == "ultramem_v2"
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "modeling_ultramem.py",
              "configuration_ultramem.py", "ultramem_backend.py", "um_model_transformer.py", "README.md"):
        assert (d / f).is_file(), f
    assert not list(d.glob("*triton*")), "kernels must not be copied"
    for f in d.glob("um_*.py"):  # the copy reaches no ultramem module, by import or by name
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not node.module.startswith("ultramem"), (f.name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("ultramem") for a in node.names), f.name
            if isinstance(node, ast.Constant) and isinstance(node.value, str):  # kernels, by name
                assert not re.fullmatch(r"ultramem(\.\w+)+", node.value), (f.name, node.value)
    card = (d / "README.md").read_text()
    assert "active parameters per token" in card and "FLOPs per token" in card and "ultramem_v2" in card
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.memory_shared.values" in keys  # the V2 pool, stored once
    assert not any(k.startswith("model.memory.") and k.endswith(".values") for k in keys)


def test_registered_class_is_used_in_process_and_trains(exported):
    """After ``import ultramem`` the registered class wins over the directory's code (no
    trust_remote_code needed); the loaded model trains through the Hugging Face loss."""
    from transformers import AutoModelForCausalLM

    from ultramem.hf.modeling_ultramem import UltramemForCausalLM

    root, dirs, _ = exported
    model = AutoModelForCausalLM.from_pretrained(dirs["tiny-moe"])
    assert type(model) is UltramemForCausalLM
    model.train()
    ids = torch.randint(0, 8192, (2, 16))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.loss.requires_grad
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_directory_code_takes_installed_ultramem(exported):
    """A fresh process where ultramem is importable but not imported: the directory's own code
    (trust_remote_code) switches to the installed ultramem (kernels) and gives the same logits."""
    root, dirs, result = exported
    script = f"""
import json, os, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({dirs["tiny-ultramem"]!r}, trust_remote_code=True)
backend = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".ultramem_backend"].BACKEND
with torch.no_grad():
    logits = model(torch.tensor([{result["tiny-ultramem"]["ids"]!r}])).logits[0]
print(json.dumps({{"backend": backend, "logits": logits.tolist()}}))
"""
    env = hf_env(root / "hf_home")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # this checkout's ultramem
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["backend"] == "ultramem"
    torch.testing.assert_close(torch.tensor(res["logits"]), torch.tensor(result["tiny-ultramem"]["logits"]),
                               atol=1e-4, rtol=0)


def test_export_refuses_existing_out(tmp_path):
    run = make_run(tmp_path / "run", "tiny-dense", "model.n_layers=1")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="--force"):
        export_run(run, tmp_path / "out")
    assert (export_run(run, tmp_path / "out", force=True) / "config.json").is_file()
    assert not list(tmp_path.glob(".tmp-*"))
