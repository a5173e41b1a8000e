"""Runs the interpreter op tests in a fresh process when this one imported Triton normally.

``pytest tests`` imports Triton while collecting earlier modules, before ``tests/ops`` can set
``TRITON_INTERPRET=1``; the kernel tests then skip in-process and run here instead.

    .venv/bin/python -m pytest tests/ops/test_interpreter_subprocess.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
MODULES = ["test_key_scores.py", "test_lookup_reduce.py", "test_retrieval.py", "test_skinny_linear.py"]


def _active() -> bool:
    try:
        import triton.language.standard as std
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(std.zeros, InterpretedFunction) and os.environ.get("TRITON_INTERPRET") == "1"


def test_interpreter_suite_in_subprocess():
    pytest.importorskip("triton")
    if _active():
        pytest.skip("the interpreter tests already run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
           *[str(HERE / m) for m in MODULES]]
    proc = subprocess.run(cmd, env=env, cwd=HERE.parent.parent, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, proc.stdout[-2000:]
