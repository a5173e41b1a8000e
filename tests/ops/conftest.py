"""Op tests: run the Triton kernels under the interpreter on CPU (``TRITON_INTERPRET=1``).

Triton decorates its own library functions when it is first imported, in interpreter mode only
if ``TRITON_INTERPRET=1`` is set by then. On a machine without a GPU, when Triton is not imported
yet (``pytest tests/ops``), this conftest sets the variable, imports Triton and the kernel
modules, and unsets it again; an autouse fixture sets it only while a test of this folder runs,
so tests elsewhere (layers with ``impl="auto"``) keep the reference path. When an earlier module
already imported Triton normally (``pytest tests``), the interpreter tests skip in-process and
``test_interpreter_subprocess.py`` runs them in a fresh process with the variable set.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

# every op's kernel module: imported here, under the interpreter, before the tests import them
KERNEL_MODULES = ["ultramem.ops.lookup_reduce.triton", "ultramem.ops.retrieval.triton",
                  "ultramem.ops.key_scores.triton", "ultramem.ops.skinny_linear.triton"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _import_interpreted() -> bool:
    """Import Triton and the kernels in interpreter mode; True if that worked."""
    preset = os.environ.get("TRITON_INTERPRET") == "1"
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    else:  # a kernel module that fails to import is an error, not a skip
        for name in KERNEL_MODULES:
            importlib.import_module(name)
    finally:
        if not preset:
            del os.environ["TRITON_INTERPRET"]
    return True


# on a GPU machine the kernels run compiled (GPU tests) and the interpreter tests in a subprocess
INTERPRETED = "triton" not in sys.modules and not _cuda() and _import_interpreted()
if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in sys.modules:  # the subprocess
    import triton.language.standard as _std
    from triton.runtime.interpreter import InterpretedFunction

    INTERPRETED = INTERPRETED or isinstance(_std.zeros, InterpretedFunction)


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    """``TRITON_INTERPRET=1`` while an op test runs (``auto`` dispatch reads it per call)."""
    if INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def interpret():
    """Skip unless the kernels run in the interpreter in this process."""
    pytest.importorskip("triton")
    if not INTERPRETED:
        pytest.skip("Triton was imported without TRITON_INTERPRET=1: run in a subprocess instead")
