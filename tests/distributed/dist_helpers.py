"""Launch the scenarios of ``workers.py`` as ``world`` gloo processes on CPU (a file store, no
ports), and the tiny configs they share with the in-process side of the tests."""

from __future__ import annotations

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
