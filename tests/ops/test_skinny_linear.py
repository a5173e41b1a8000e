"""Skinny linear: the decode GEMV kernel (interpreter on CPU) against ``F.linear``.

    .venv/bin/python -m pytest tests/ops/test_skinny_linear.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ultramem.ops.skinny_linear as sl
from ultramem.ops.skinny_linear import skinny_linear
from ultramem.ops.tuning import tuned

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("interpret")]

# (lead shape of x, K, N): K not a multiple of the K tile, odd N, 1-8 rows
SHAPES = [((1,), 20, 7), ((3,), 100, 33), ((2, 1), 1030, 5), ((8,), 64, 16), ((5,), 300, 129),
          ((1, 1), 2048, 9)]


@pytest.fixture(autouse=True)
def _all_kernel_rows():
    """The dispatcher sends one row to the kernel by default (a loss above, on H200); the
    kernel handles up to KERNEL_MAX_ROWS: test all of them."""
    with tuned(skinny_linear_max_rows=sl.KERNEL_MAX_ROWS):
        yield


def _kernel_calls(monkeypatch) -> list:
    import ultramem.ops.skinny_linear.triton as slk

    calls = []
    real = slk.skinny_linear
    monkeypatch.setattr(slk, "skinny_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@pytest.mark.parametrize("case", SHAPES, ids=lambda c: "x".join(map(str, (*c[0], c[1], c[2]))))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_linear(case, dtype, monkeypatch):
    lead, k, n = case
    g = torch.Generator().manual_seed(k * 31 + n)
    x = torch.randn(*lead, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    calls = _kernel_calls(monkeypatch)
    out = skinny_linear(x.to(dtype), w.to(dtype), impl="triton")
    assert calls, "the kernel was not used"
    assert out.shape == (*lead, n) and out.dtype == dtype
    exact = F.linear(x.double().to(dtype).double(), w.double().to(dtype).double())
    ref_err = (F.linear(x.to(dtype), w.to(dtype)).double() - exact).abs().max().item()
    err = (out.double() - exact).abs().max().item()
    # the interpreter's fp32 -> bf16 cast truncates (the GPU's rounds to nearest): one more ulp
    ulp = exact.abs().max().item() * 2**-7 if dtype == torch.bfloat16 else 0.0
    assert err <= 2 * ref_err + ulp + 1e-5, (err, ref_err)


def test_non_contiguous_rows(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 40, generator=g)[:, 0]  # row stride 80
    w = torch.randn(6, 40, generator=g)
    calls = _kernel_calls(monkeypatch)
    torch.testing.assert_close(skinny_linear(x, w, impl="triton"), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert calls


def test_falls_back_for_training_many_rows_and_torch(monkeypatch):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 40, generator=g, requires_grad=True)
    calls = _kernel_calls(monkeypatch)
    x = torch.randn(2, 40, generator=g, requires_grad=True)
    y = skinny_linear(x, w, impl="triton")  # gradient recorded: the reference, autograd intact
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.detach().sum(0).expand(2, 40))
    with torch.no_grad():
        many = torch.randn(sl.KERNEL_MAX_ROWS + 1, 40, generator=g)
        torch.testing.assert_close(skinny_linear(many, w, impl="triton"), F.linear(many, w))
        skinny_linear(x, w, impl="torch")
        with tuned(skinny_linear_max_rows=1):  # the default: two rows take cuBLAS
            skinny_linear(x, w, impl="auto")
    assert not calls
    with torch.no_grad():
        skinny_linear(x, w, impl="auto")
    assert calls  # and the same call with auto takes the kernel


def test_wide_large_weights_take_cublas(monkeypatch):
    """Weights wider than 2 K and at least WIDE_MIN_ELEMS large go to F.linear (cuBLAS's GEMV
    is faster there on H200); a square or narrow one of the same size takes the kernel."""
    monkeypatch.setattr(sl, "WIDE_MIN_ELEMS", 1000)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 20, generator=g)
    wide, small_wide, narrow = (torch.randn(n, k, generator=g) for n, k in ((100, 20), (45, 20), (20, 60)))
    calls = _kernel_calls(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(skinny_linear(x, wide, impl="triton"), F.linear(x, wide))
        assert not calls
        skinny_linear(x, small_wide, impl="triton")  # 900 elements: under the size bound
        skinny_linear(torch.randn(1, 60, generator=g), narrow, impl="triton")
    assert len(calls) == 2
    assert sl.kernel_shape(2048, 2048) and sl.kernel_shape(2048, 8192) and not sl.kernel_shape(8192, 2048)

