"""Key scores: the op's checks and eps rule, and its reference against the modules it replaces.

The op has no Triton kernel (a fused decode kernel measured slower than the reference on an
H200 and was removed, docs/kernels.md); every impl runs the reference.

    .venv/bin/python -m pytest tests/ops/test_key_scores.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ultramem.errors import ConfigError
from ultramem.ops.key_scores import key_scores, reference, resolve_eps


def _inputs(t, qg, h, n, r, rq, k, norm, dtype=torch.float32, affine=(True, True)):
    g = torch.Generator().manual_seed(t * 1000 + n * 10 + k + r)
    q = (torch.randn(t, qg, 2, rq, k, generator=g) * 2 + 0.5).to(dtype)  # nonzero mean
    keys = torch.randn(2, h, n, r, k, generator=g).to(dtype) / k**0.5
    w = (1 + 0.5 * torch.randn(k, generator=g)).to(dtype) if norm != "none" and affine[0] else None
    b = (0.3 * torch.randn(k, generator=g)).to(dtype) if norm == "layernorm" and affine[1] else None
    return q, keys, norm, w, b


@pytest.mark.parametrize("impl", ["auto", "torch", "triton"])
def test_every_impl_is_the_reference_with_gradients(impl):
    """All impls give the reference's scores and gradients (the reference is the op)."""
    q, keys, norm, w, b = _inputs(3, 1, 2, 5, 2, 1, 20, "layernorm")
    leaves = [x.clone().requires_grad_() for x in (q, keys, w, b)]
    ours = key_scores(leaves[0], leaves[1], norm, leaves[2], leaves[3], impl=impl)
    ref_leaves = [x.clone().requires_grad_() for x in (q, keys, w, b)]
    ref = reference.key_scores(ref_leaves[0], ref_leaves[1], norm, ref_leaves[2], ref_leaves[3])
    g = torch.Generator().manual_seed(1)
    gy = [torch.randn(x.shape, generator=g) for x in ref]
    for o, r_ in zip(ours, ref):
        torch.testing.assert_close(o, r_, rtol=0, atol=0)
    got = torch.autograd.grad(ours, leaves, gy)
    want = torch.autograd.grad(ref, ref_leaves, gy)
    for a, b_ in zip(got, want):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b_, rtol=0, atol=0)


def test_errors():
    q, keys, norm, w, b = _inputs(2, 1, 2, 5, 2, 1, 20, "layernorm")
    with pytest.raises(ValueError, match="unknown norm"):
        key_scores(q, keys, "batchnorm")
    with pytest.raises(ValueError, match="bias"):
        key_scores(q, keys, "rmsnorm", w, b)
    with pytest.raises(ValueError, match="weight"):
        key_scores(q, keys, "none", w)
    with pytest.raises(ValueError, match="rq"):
        key_scores(q.expand(2, 1, 2, 3, 20), keys)
    with pytest.raises(ValueError, match="multiple"):
        key_scores(q.expand(2, 3, 2, 1, 20), keys)
    with pytest.raises(ConfigError, match="impl 'cuda'"):
        key_scores(q, keys, impl="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_resolve_eps_matches_torch(dtype):
    """``eps=None`` is resolved as PyTorch does: F.rms_norm(eps=None) equals it with the
    resolved eps (fp32's machine epsilon for bf16 / fp16, not theirs); LayerNorm's 1e-5."""
    x = torch.randn(4, 16).to(dtype) * 1e-4  # tiny: the epsilon dominates the mean square
    w = torch.randn(16).to(dtype)
    eps = resolve_eps("rmsnorm", None, dtype)
    assert eps == torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    torch.testing.assert_close(F.rms_norm(x, (16,), w, None), F.rms_norm(x, (16,), w, eps),
                               rtol=0, atol=0)
    assert resolve_eps("layernorm", None, dtype) == torch.nn.LayerNorm(16).eps
    assert resolve_eps("rmsnorm", 1e-3, dtype) == 1e-3


@pytest.mark.parametrize("norm,rq", [("layernorm", 1), ("rmsnorm", 3), ("none", 1)])
def test_reference_is_the_modules(norm, rq):
    """The reference equals ``nn.LayerNorm`` / ``nn.RMSNorm`` (default eps: 1e-5 / None) with a
    non-trivial affine, then the per-rank einsum of ``MemoryRetrieval.per_rank_scores``, when
    given the modules' weight, bias and eps."""
    mod = {"layernorm": torch.nn.LayerNorm(12), "rmsnorm": torch.nn.RMSNorm(12),
           "none": torch.nn.Identity()}[norm]
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q = torch.randn(5, 2, 2, rq, 12) * 1e-3  # small: eps matters; 2 query groups
    keys = torch.randn(2, 4, 7, 3, 12)  # 4 heads: 2 a group
    head_map = torch.arange(4) // 2
    kh = keys.transpose(0, 1)  # [H, 2, N, r, K]
    with torch.no_grad():
        qh = mod(q).index_select(1, head_map)
        want = (torch.einsum("thsk,hsnrk->thsnr", qh[:, :, :, 0], kh) if rq == 1
                else torch.einsum("thsrk,hsnrk->thsnr", qh, kh))  # [T, H, 2, N, r]
        want = want.view(5, 2, 2, 2, 7, 3).transpose(0, 1)  # [Q, T, G, 2, N, r]
        got = reference.key_scores(q, keys, norm, getattr(mod, "weight", None),
                                   getattr(mod, "bias", None), getattr(mod, "eps", None))
    torch.testing.assert_close(got[0], want[:, :, :, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[:, :, :, 1], rtol=1e-6, atol=1e-6)
