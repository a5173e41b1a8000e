"""The selected-experts Triton kernel (``ops.moe_experts``) equals its torch reference, under
the Triton interpreter on CPU (run in a fresh process with ``TRITON_INTERPRET=1`` when this
one imported Triton normally) and on the GPU."""

from __future__ import annotations

import pytest
import torch

from ultramem.ops.moe_experts import expert_mlp, triton_available

CASES = [  # (tokens, k, experts, D, h, gated): odd sizes exercise the masks and the K split
    (1, 2, 5, 70, 130, False), (3, 3, 6, 64, 200, True), (2, 1, 3, 33, 17, True),
]


def _check(device: str, dtype: torch.dtype, atol: float) -> None:
    torch.manual_seed(0)
    for t, k, e, d, h, gated in CASES:
        x = torch.randn(t, d, device=device, dtype=dtype)
        experts = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(device)
        w_up = (torch.randn(e, d, h) / d**0.5).to(device, dtype)
        w_gate = (torch.randn(e, d, h) / d**0.5).to(device, dtype) if gated else None
        w_down = (torch.randn(e, h, d) / h**0.5).to(device, dtype)
        assert triton_available(x, w_up)
        with torch.no_grad():
            got = expert_mlp(x, experts, w_up, w_gate, w_down, impl="triton")
            ref = expert_mlp(x.double(), experts, w_up.double(), None if w_gate is None else w_gate.double(),
                             w_down.double(), impl="torch")
        assert got.shape == (t, k, d) and got.dtype == dtype
        assert ref.abs().max() > 0.1
        err = (got.double() - ref).abs().max().item()
        assert err < atol, (t, k, e, d, h, gated, err)


@pytest.mark.interpreter
def test_kernel_matches_reference_under_the_interpreter(interpret):
    _check("cpu", torch.float32, 1e-4)


def test_gradients_fall_back_to_the_differentiable_reference():
    x = torch.randn(2, 16, requires_grad=True)
    w = [torch.randn(4, 16, 8, requires_grad=True), None, torch.randn(4, 8, 16, requires_grad=True)]
    y = expert_mlp(x, torch.tensor([[0, 3], [1, 2]]), *w)
    y.sum().backward()
    assert x.grad.abs().sum() > 0 and w[0].grad[[0, 1, 2, 3]].abs().sum() > 0


@pytest.mark.gpu
def test_kernel_matches_reference_on_gpu():
    _check("cuda", torch.bfloat16, 5e-2)
