"""The error rule of the op tests (STYLE.md, after flash-attention): a kernel's error against an
exact (fp64) reference is at most twice the same-dtype PyTorch reference's error."""

from __future__ import annotations

import torch


def assert_rule(ours: torch.Tensor, same: torch.Tensor, exact: torch.Tensor, name: str) -> None:
    """``|ours - exact| <= 2 |same - exact| + tiny`` (max norms)."""
    err = (ours.double() - exact).abs().max().item()
    base = (same.double() - exact).abs().max().item()
    scale = exact.abs().max().item() + 1e-12
    assert err <= 2 * base + 1e-6 * scale, f"{name}: kernel err {err:.3g} vs reference err {base:.3g}"
