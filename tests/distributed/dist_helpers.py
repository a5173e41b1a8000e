"""Launch the scenarios of ``workers.py`` as ``world`` gloo processes on CPU (a file store, no
ports), and the trainer under ``torchrun`` (:func:`torchrun`, with the small training
overrides the trainer tests share)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).with_name("workers.py")


def launch(scenario: str, world: int, tmp: Path, *args: str, timeout: float = 300) -> list[tuple[int, str]]:
    """Run ``workers.py scenario`` on ranks ``0..world-1``; returns ``(returncode, stderr)`` per
    rank. Ranks still running after ``timeout`` seconds are killed (returncode -9)."""
    tmp.mkdir(parents=True, exist_ok=True)
    store = tmp / f"store-{scenario}-{time.monotonic_ns()}"
    env = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{WORKERS.parent}"}
    procs = []
    for rank in range(world):
        err = open(tmp / f"{scenario}-rank{rank}.err", "w+")  # noqa: SIM115 -- closed below
        cmd = [sys.executable, str(WORKERS), scenario, str(rank), str(world), str(store), str(tmp), *args]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=err, stderr=subprocess.STDOUT), err))
    deadline = time.monotonic() + timeout
    out = []
    for p, err in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        err.seek(0)
        out.append((p.returncode, err.read()))
        err.close()
    return out


def assert_ok(results: list[tuple[int, str]]) -> None:
    for rank, (rc, log) in enumerate(results):
        assert rc == 0, f"rank {rank} exited {rc}:\n{log[-4000:]}"


def trainer_overrides(data: Path, **extra) -> list[str]:
    """``key=value`` overrides of a 4-step CPU run on the prepared corpus slice ``data``."""
    base = {"data.path": str(data), "data.seq_len": 32, "train.batch_size": 4, "train.max_steps": 4,
            "train.lr": 3e-3, "train.warmup_frac": 0.1, "train.eval_every": 0, "train.eval_batches": 2,
            "train.ckpt_every": 0, "train.device": "cpu", **extra}
    return [f"{k}={v}" for k, v in base.items()]


def losses(run: Path) -> list[float]:
    """The training losses of ``run/metrics.jsonl``, one per step."""
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def torchrun(preset: str | None, out: Path, overrides: list[str], *flags: str, nproc: int = 2) -> None:
    """``ultramem train`` on ``nproc`` gloo processes (``torchrun --standalone``); asserts it succeeded."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           "-m", "ultramem.cli", "train", *(["--preset", preset] if preset else []), "--out", str(out),
           "--no-progress", *flags, *overrides]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
