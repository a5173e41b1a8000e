"""``benchmarks/ops.py --smoke``: every benchmark code path on tiny shapes, on CPU under the Triton
interpreter (its own process: the interpreter must be on before Triton is imported). Marked slow
(about 35 s of CPU): ``pytest -m slow tests/ops/test_benchmark_smoke.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ops_benchmark_smoke():
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ops.py"), "--smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if " us " in line]
    ops = {line.split()[0] for line in rows}
    assert ops == {"lookup_reduce", "tucker_topk", "layer_decode", "layer_decode_prefix",
                   "layer_train_step", "module_decode"}, ops
    assert sum(" triton " in line for line in rows) >= 10  # the kernels ran, not only torch
