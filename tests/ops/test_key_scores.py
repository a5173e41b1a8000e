"""Key scores: the Triton kernel (interpreter on CPU) against the PyTorch reference.

Query norm none / layernorm / rmsnorm with non-trivial affines, shared queries (H = 2Q) and one
query per head, one query for all ranks (rq = 1) and one per rank (rq = r), non-power-of-two K
and N, every tile path (multiply + row sum, tl.dot over 16 / 32 tokens, tiles that do not
divide the rows), fp32, bf16 and fp16; the dispatch (gradients, impl="torch", T above the
limit, no kernels) and the eps rule; the reference against the layer it was taken from.
Tolerance rule (STYLE.md): the kernel's error against an fp64 reference is at most about twice
the same-dtype PyTorch reference's error.

    .venv/bin/python -m pytest tests/ops/test_key_scores.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_rules import assert_rule

import ultramem.ops.key_scores as ks
from ultramem.ops.key_scores import key_scores, reference, resolve_eps

interpret = pytest.mark.usefixtures("interpret")

# (T, Q, H, N, r, rq, K, norm): Q = 1 with H = 2 shares the query (the 1.6B-x12 layout, K 448
# scaled to 40), Q = H one query per head
CASES = [
    (1, 1, 2, 37, 2, 1, 40, "layernorm"),
    (3, 1, 2, 130, 2, 1, 40, "layernorm"),
    (17, 2, 2, 37, 2, 2, 20, "layernorm"),
    (64, 1, 2, 5, 2, 1, 36, "layernorm"),
    (1, 2, 2, 130, 3, 3, 36, "rmsnorm"),
    (3, 2, 4, 5, 3, 1, 20, "rmsnorm"),
    (17, 1, 2, 37, 1, 1, 40, "rmsnorm"),
    (1, 1, 2, 5, 1, 1, 20, "none"),
    (64, 2, 2, 37, 3, 3, 40, "none"),
]


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
    """The kernel is off by default (slower than the reference on an H200): on for these tests."""
    if ks._kernels is not None:
        monkeypatch.setattr(ks._kernels, "USE_KERNEL", True)


@interpret
def test_kernel_off_by_default(monkeypatch):
    spy = _Spy(ks._kernels.key_scores, refuse=True)
    monkeypatch.setattr(ks._kernels, "key_scores", spy)
    monkeypatch.setattr(ks._kernels, "USE_KERNEL", False)
    inputs = _inputs(3, 1, 2, 5, 2, 1, 20, "layernorm")
    torch.testing.assert_close(key_scores(*inputs, impl="triton"), reference.key_scores(*inputs))
    assert spy.calls == 0


def _inputs(t, qg, h, n, r, rq, k, norm, dtype=torch.float32, affine=(True, True)):
    g = torch.Generator().manual_seed(t * 1000 + n * 10 + k + r)
    q = (torch.randn(t, qg, 2, rq, k, generator=g) * 2 + 0.5).to(dtype)  # nonzero mean
    keys = torch.randn(2, h, n, r, k, generator=g).to(dtype) / k**0.5
    w = (1 + 0.5 * torch.randn(k, generator=g)).to(dtype) if norm != "none" and affine[0] else None
    b = (0.3 * torch.randn(k, generator=g)).to(dtype) if norm == "layernorm" and affine[1] else None
    return q, keys, norm, w, b


def _f64(q, keys, norm, w, b):
    return (q.double(), keys.double(), norm, None if w is None else w.double(),
            None if b is None else b.double())


def _check(inputs, eps=1e-5, name=""):
    """Kernel (impl="triton") vs the same-dtype reference vs the fp64 reference, both sides."""
    ours = key_scores(*inputs, eps=eps, impl="triton")
    same = reference.key_scores(*inputs, eps=eps)
    exact = reference.key_scores(*_f64(*inputs), eps=resolve_eps(inputs[2], eps, inputs[0].dtype))
    (t, n_q), h, (n, r) = inputs[0].shape[:2], inputs[1].shape[1], inputs[1].shape[2:4]
    for o, s, x, side in zip(ours, same, exact, ("row", "col")):
        assert o.shape == (n_q, t, h // n_q, n, r) and o.dtype == inputs[0].dtype and o.is_contiguous()
        assert_rule(o, s, x, f"{name} s_{side}")


@interpret
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_reference(case):
    _check(_inputs(*case), name=str(case))


# ULTRAMEM_KS_BLOCKS strings "BLOCK_M,TB,num_warps[,BK]" on small shapes: multiply + row sum
# over several tokens, tl.dot over 16 / 32 / 64 tokens and several steps of tokens
# (K in chunks of BK: several, the last one partial), tiles that do not divide the rows
TILE_PATHS = [
    ("16,1,4", (5, 1, 2, 37, 2, 1, 40, "layernorm")),
    ("32,1,2", (3, 2, 2, 37, 3, 3, 20, "rmsnorm")),
    ("16,16,4,16", (1, 1, 2, 37, 2, 1, 40, "layernorm")),
    ("16,16,4,16", (40, 2, 2, 5, 3, 3, 36, "layernorm")),
    ("64,32,8,64", (33, 1, 2, 130, 2, 1, 20, "rmsnorm")),
    ("32,64,4,16", (64, 2, 2, 37, 3, 3, 40, "none")),
]


@interpret
@pytest.mark.parametrize("blocks,case", TILE_PATHS, ids=lambda x: str(x).replace(" ", ""))
def test_tile_paths(blocks, case, monkeypatch):
    monkeypatch.setattr(ks._kernels, "BLOCKS", blocks)
    _check(_inputs(*case), name=blocks)


@interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[5]],
                         ids=lambda c: "x".join(map(str, c)))
def test_low_precision(case, dtype):
    """bf16 / fp16 queries, keys and affine: fp32 norm and accumulation inside, the norm output
    rounded to the key dtype as the reference's, within the rule."""
    _check(_inputs(*case, dtype=dtype), name=f"{case} {dtype}")


@interpret
@pytest.mark.parametrize("norm,affine,eps", [
    ("layernorm", (True, False), 1e-5), ("layernorm", (False, True), 1e-3),
    ("layernorm", (False, False), None), ("rmsnorm", (False, False), 1e-5),
    ("rmsnorm", (True, False), None),
])
def test_affine_and_eps(norm, affine, eps):
    """Weight only, bias only, no affine; eps given, or None (PyTorch's default of the norm)."""
    for dtype in (torch.float32, torch.bfloat16):
        inputs = _inputs(3, 1, 2, 37, 2, 1, 20, norm, dtype=dtype, affine=affine)
        inputs = (inputs[0] * 1e-3, *inputs[1:])  # small queries: eps matters
        _check(inputs, eps=eps, name=f"{norm} {affine} {eps} {dtype}")


@interpret
@pytest.mark.parametrize("blocks", ["16,1,4", "16,16,4,16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm_far_from_zero(blocks, dtype, monkeypatch):
    """Queries with a mean 30 standard deviations from zero: the dot path's shifted statistics
    and centred operand keep it within the rule (a plain E[x^2] - E[x]^2 would not)."""
    monkeypatch.setattr(ks._kernels, "BLOCKS", blocks)
    q, *rest = _inputs(5, 1, 2, 37, 2, 1, 40, "layernorm", dtype=torch.float32)
    q = (30 + q.float() / 2 + torch.linspace(-1, 1, 40)).to(dtype)  # mean varies along K
    _check((q, *(x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x
                 for x in rest)), name=f"far {blocks} {dtype}")


@interpret
def test_strided_queries():
    """Queries as a strided view (a wider projection output): the kernel takes the strides."""
    q, keys, norm, w, b = _inputs(17, 2, 4, 37, 2, 2, 20, "layernorm")
    wide = torch.randn(17, 3, 2, 2, 24)
    wide[:, :2, :, :, :20] = q
    view = wide[:, :2, :, :, :20]
    assert not view.is_contiguous()
    _check((view, keys, norm, w, b), name="strided")


class _Spy:
    """Counts calls of the kernel entry point (and can refuse them)."""

    def __init__(self, fn, refuse: bool = False):
        self.fn, self.refuse, self.calls = fn, refuse, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.refuse:
            raise AssertionError("the kernel must not run here")
        return self.fn(*args, **kwargs)


@interpret
def test_grad_takes_reference(monkeypatch):
    """Inputs that require grad under grad mode -> the reference, and gradients flow (equal to
    the reference's); the same inputs under no_grad -> the kernel."""
    spy = _Spy(ks._kernels.key_scores, refuse=True)
    monkeypatch.setattr(ks._kernels, "key_scores", spy)
    q, keys, norm, w, b = _inputs(3, 1, 2, 5, 2, 1, 20, "layernorm")
    gy = [torch.randn(1, 3, 2, 5, 2), torch.randn(1, 3, 2, 5, 2)]
    grads = []
    for impl in ("auto", "torch"):
        leaves = [x.clone().requires_grad_() for x in (q, keys, w, b)]
        sr, sc = key_scores(leaves[0], leaves[1], norm, leaves[2], leaves[3], impl=impl)
        grads.append(torch.autograd.grad((sr * gy[0]).sum() + (sc * gy[1]).sum(), leaves))
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r)
    assert spy.calls == 0
    spy.refuse = True
    w_only = w.clone().requires_grad_()  # one parameter needing grad is enough
    key_scores(q, keys, norm, w_only, b)
    assert spy.calls == 0
    spy.refuse = False
    with torch.no_grad():
        key_scores(q, keys, norm, w_only, b)
    assert spy.calls == 1


@interpret
def test_torch_impl_and_long_batches_take_reference(monkeypatch):
    """impl="torch" never calls the kernel; neither does T > MAX_T; T = MAX_T does."""
    spy = _Spy(ks._kernels.key_scores, refuse=True)
    monkeypatch.setattr(ks._kernels, "key_scores", spy)
    limit = ks._kernels.MAX_T
    inputs = _inputs(limit + 1, 1, 2, 5, 2, 1, 20, "rmsnorm")
    ref = reference.key_scores(*inputs)
    for impl, t in (("torch", 1), ("torch", limit), ("auto", limit + 1), ("triton", limit + 1)):
        out = key_scores(inputs[0][:t], *inputs[1:], impl=impl)
        torch.testing.assert_close(out[0], ref[0][:, :t])
    assert spy.calls == 0
    spy.refuse = False
    key_scores(inputs[0][:limit], *inputs[1:], impl="auto")
    assert spy.calls == 1


def test_no_kernels_falls_back(monkeypatch):
    """Without Triton (or off the interpreter on CPU) every impl runs the reference."""
    inputs = _inputs(3, 1, 2, 5, 2, 1, 20, "layernorm")
    ref = reference.key_scores(*inputs)
    monkeypatch.setattr(ks, "_kernels", None)
    for impl in ("auto", "triton", "torch"):
        out = key_scores(*inputs, impl=impl)
        torch.testing.assert_close(out[0], ref[0])
        torch.testing.assert_close(out[1], ref[1])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not ks.triton_available(inputs[0])


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
    with pytest.raises(ValueError, match="impl"):
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


def test_blocks_rule(monkeypatch):
    """Default tiles by T (1.6B-x12: K 448) and dtype, and the ULTRAMEM_KS_BLOCKS override."""
    k = ks._kernels
    monkeypatch.setattr(k, "BLOCKS", None)
    C = k.KsCfg
    assert k._blocks(1, 448) == k._blocks(2, 448) == C(16, 1, 4)
    assert k._blocks(1, 40) == C(128, 1, 4) and k._blocks(1, 1024) == C(16, 1, 8)
    assert k._blocks(3, 448) == k._blocks(16, 448) == C(64, 16, 4, 32)
    assert k._blocks(33, 448) == C(64, 64, 8, 32)
    assert k._blocks(64, 448, fp32=True) == C(32, 64, 8, 16)
    monkeypatch.setattr(k, "BLOCKS", "128,64,8")
    assert k._blocks(1, 448) == C(128, 64, 8, 64)
    monkeypatch.setattr(k, "BLOCKS", "32,16,4,16")
    assert k._blocks(1, 448) == C(32, 16, 4, 16)


def test_pdl_switch(monkeypatch):
    """USE_PDL launches with launch_pdl on a GPU, never in the interpreter (CPU tensors)."""
    k = ks._kernels
    if k is None:
        pytest.skip("no Triton")
    monkeypatch.setattr(k, "USE_PDL", True)
    q, keys, norm, w, b = _inputs(2, 1, 2, 5, 2, 1, 20, "layernorm")
    out = torch.empty(2, 1, 2, 2, 5, 2)
    _, _, kw = k._launch(q, keys, norm, w, b, 1e-5, out)
    assert kw["PDL"] is False and "launch_pdl" not in kw
    meta = [x.to("meta") for x in (q, keys, w, b, out)]
    _, _, kw = k._launch(*meta[:2], norm, *meta[2:4], 1e-5, meta[4])
    assert kw["PDL"] is True and kw["launch_pdl"] is True and kw["INTERP"] is False


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
