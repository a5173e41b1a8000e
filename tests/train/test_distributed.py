"""Two gloo processes on CPU compute what one process computes (same global batch)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_overrides

from ultramem import checkpoint as ckpt
from ultramem.config import load_config
from ultramem.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]


def _losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(slice_data, tmp_path, parallel):
    steps = 4
    single = tiny_overrides(slice_data, **{"train.max_steps": steps, "train.batch_size": 4})
    train(load_config(overrides=single), tmp_path / "one", progress=False)
    multi = tiny_overrides(slice_data, **{"train.max_steps": steps, "train.batch_size": 2,
                                          "train.parallel": parallel, "train.ckpt_every": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "ultramem.cli", "train", "--out", str(tmp_path / "two"), "--no-progress", *multi]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "two")), torch.tensor(_losses(tmp_path / "one")),
                               rtol=1e-4, atol=1e-4)
    # the checkpoint written by the 2-process run holds full weights, loadable on one process
    from ultramem.inference.load import load_run

    assert load_run(tmp_path / "two").step == steps
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "two")] == ["step_0000002", "step_0000004"]
