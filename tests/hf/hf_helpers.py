"""Shared by the Hugging Face tests: tiny runs of every layer type, and a fresh interpreter in
which ultramem cannot be imported."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ultramem.checkpoint import save_checkpoint
from ultramem.data.tokenizer import default_tokenizer_path
from ultramem.model.transformer import Transformer
from ultramem.resolve import load_config

PRESETS = ("tiny-dense", "tiny-moe", "tiny-pkm", "tiny-memory-plus", "tiny-ultramem", "tiny-ultramem-v2")

# Put first in a child interpreter: every `import ultramem...` fails there, as on a machine
# without ultramem installed (the venv's editable install would otherwise find it).
BLOCK_ULTRAMEM = '''
import sys
class _NoUltramem:
    def find_spec(self, name, path=None, target=None):
        if name == "ultramem" or name.startswith("ultramem."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _NoUltramem())
'''


def make_run(out: Path, preset: str, *overrides: str, seed: int = 0) -> Path:
    """A run directory with one checkpoint of a freshly initialised model and the tokenizer."""
    torch.manual_seed(seed)
    cfg = load_config(preset, overrides=["model.max_seq_len=64", *overrides])
    model = Transformer.build(cfg.model)
    with torch.no_grad():  # move the norms off identity, so a wrong load cannot go unseen
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.mul_(1 + 0.1 * torch.randn_like(p))
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, 1, model.state_dict(), {}, {"step": 1}, cfg.to_dict())
    shutil.copyfile(default_tokenizer_path(), out / "tokenizer.json")
    return out


def hf_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
    return env


def run_without_ultramem(script: str, cwd: Path, home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter, outside the repository, with ultramem blocked."""
    path = cwd / "child.py"
    path.write_text(BLOCK_ULTRAMEM + script)
    return subprocess.run([sys.executable, str(path)], cwd=cwd, env=hf_env(home), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
