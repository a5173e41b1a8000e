"""Op tests. Those marked ``interpreter`` run the Triton kernels on CPU tensors under Triton's
interpreter, which must be on before Triton is first imported, so for the whole process.
``make test`` runs them as their own pytest invocation after the rest of the suite:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/ops -m interpreter

Without ``TRITON_INTERPRET=1`` they skip, naming that command (``make test``'s first
invocation deselects them instead, so a skip there is only a GPU test).
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def interpret():
    """Skip unless this process runs Triton in interpreter mode."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("kernel test under the interpreter: TRITON_INTERPRET=1 pytest tests/ops "
                    "-m interpreter")
    pytest.importorskip("triton")
