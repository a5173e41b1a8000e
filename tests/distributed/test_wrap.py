"""The trainer on two gloo processes (torchrun) computes what one process computes (same
global batch), with DDP and with FSDP (``ultramem.distributed.wrap``): the dense tiny model,
tiny UltraMem and tiny UltraMemV2 (value tables split over both ranks, ``memory_parallel=2``).
The memory presets under DDP (nothing memory-specific: DDP averages every gradient) are
``slow`` (about a minute each on the 2-core CI machine): ``pytest -m slow tests/distributed``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ultramem import checkpoint as ckpt
from ultramem.inference.load import load_run
from ultramem.resolve import load_config
from ultramem.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]
DENSE = {"model.vocab_size": 8192, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2,
         "model.max_seq_len": 64, "model.ffn.hidden": 128}


def _overrides(data: Path, **extra) -> list[str]:
    base = {"data.path": str(data), "data.seq_len": 32, "train.batch_size": 4, "train.max_steps": 4,
            "train.lr": 3e-3, "train.warmup_frac": 0.1, "train.eval_every": 0, "train.eval_batches": 2,
            "train.ckpt_every": 0, "train.device": "cpu", **extra}
    return [f"{k}={v}" for k, v in base.items()]


def _losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


CASES = [
    pytest.param(None, "ddp", DENSE, id="dense-ddp"),
    pytest.param(None, "fsdp", DENSE, id="dense-fsdp"),
    pytest.param("tiny-ultramem", "ddp", {}, id="ultramem-ddp", marks=pytest.mark.slow),
    pytest.param("tiny-ultramem", "fsdp", {"train.memory_parallel": 2}, id="ultramem-fsdp-mp2"),
    pytest.param("tiny-ultramem-v2", "ddp", {}, id="ultramem-v2-ddp", marks=pytest.mark.slow),
    pytest.param("tiny-ultramem-v2", "fsdp", {"train.memory_parallel": 2}, id="ultramem-v2-fsdp-mp2"),
]


@pytest.mark.distributed
@pytest.mark.parametrize("preset,parallel,extra", CASES)
def test_two_processes_match_one(slice_data, tmp_path, preset, parallel, extra):
    steps = 4
    single = _overrides(slice_data, **{k: v for k, v in extra.items() if k != "train.memory_parallel"})
    train(load_config(preset, overrides=single), tmp_path / "one", progress=False)
    multi = _overrides(slice_data, **{**extra, "train.batch_size": 2, "train.parallel": parallel,
                                      "train.ckpt_every": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "ultramem.cli", "train", "--out", str(tmp_path / "two"), "--no-progress", *multi]
    if preset is not None:
        cmd[cmd.index("--out"):cmd.index("--out")] = ["--preset", preset]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "two")), torch.tensor(_losses(tmp_path / "one")),
                               rtol=1e-4, atol=1e-4)
    # the checkpoint written by the 2-process run holds full weights, loadable on one process
    assert load_run(tmp_path / "two").step == steps
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "two")] == ["step_0000002", "step_0000004"]
