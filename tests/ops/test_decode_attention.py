"""Decode attention: the split-KV kernel and the fused rotary + cache write (interpreter on CPU,
fp32 and bf16; GPU-marked tests in bf16 at model sizes and inside a CUDA graph) against
``ops/decode_attention/reference.py``.

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/ops/test_decode_attention.py -m interpreter
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_rules import assert_rule

from ultramem.ops.decode_attention import decode_attention, reference, rope_write
from ultramem.ops.tuning import tuned

# (B, H, H_kv, L, hd, kv_len, lengths): ragged, GQA (2 and 4 query heads a key head), a head dim
# that is not a power of two, a length past kv_len (clipped), lengths of 1, one split and many
CASES = [
    (3, 4, 4, 40, 16, 40, [1, 17, 40]),
    (2, 8, 2, 70, 32, 70, [70, 33]),
    (4, 6, 3, 50, 24, 48, [5, 48, 50, 1]),
    (1, 2, 1, 300, 16, 300, [257]),
]


def _inputs(case, dtype, device="cpu", seed=0):
    b, h, h_kv, length, d, kv_len, lengths = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, d, generator=g)
    k = torch.randn(b, h_kv, length, d, generator=g)
    v = torch.randn(b, h_kv, length, d, generator=g)
    n = torch.tensor(lengths)
    return [t.to(device, dtype) for t in (q, k, v)] + [n.to(device), kv_len]


def _kernel_calls(monkeypatch, name: str) -> list:
    import ultramem.ops.decode_attention.triton as dak

    calls, real = [], getattr(dak, name)
    monkeypatch.setattr(dak, name, lambda *a: calls.append(1) or real(*a))
    return calls


def _check_attention(case, dtype, device, tile=None):
    q, k, v, n, kv_len = _inputs(case, dtype, device, seed=len(case[-1]))
    with tuned(decode_attention_tile=tile):
        out = decode_attention(q, k, v, n, kv_len, impl="triton")
    assert out.shape == q.shape and out.dtype == dtype
    exact = reference.decode_attention(*(t.double() for t in (q, k, v)), n, kv_len)
    same = reference.decode_attention(q, k, v, n, kv_len)
    if dtype == torch.bfloat16 and device == "cpu":
        # the interpreter's fp32 -> bf16 cast truncates (the GPU's rounds to nearest): one ulp more
        err = (out.double() - exact).abs().max().item()
        base = (same.double() - exact).abs().max().item()
        assert err <= 2 * base + exact.abs().max().item() * 2**-7, (err, base)
    else:
        assert_rule(out, same, exact, f"decode_attention {case[:6]}")
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:6])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tile", [None, (16, 4, 1), (16, 4, 1 << 20)], ids=["default", "one-split", "max-split"])
@pytest.mark.interpreter
@pytest.mark.usefixtures("interpret")
def test_attention_matches_reference(case, dtype, tile, monkeypatch):
    calls = _kernel_calls(monkeypatch, "decode_attention")
    _check_attention(case, dtype, "cpu", tile)
    assert calls, "the kernel was not used"


@pytest.mark.interpreter
@pytest.mark.usefixtures("interpret")
def test_attention_ignores_positions_past_the_length():
    """Garbage (inf, nan) in the cache past each length must not reach the output."""
    q, k, v, n, kv_len = _inputs(CASES[0], torch.float32)
    ref = reference.decode_attention(q, k, v, n, kv_len)
    for b, length in enumerate(n.tolist()):
        k[b, :, length:] = float("nan")
        v[b, :, length:] = float("inf")
    out = decode_attention(q, k, v, n, kv_len, impl="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


ROPE_CASES = [(3, 4, 4, 16, 12, [0, 5, 11]), (2, 8, 2, 32, 9, [8, 3]), (2, 6, 3, 24, 7, [6, 7])]  # last: pos >= L


def _rope_inputs(case, dtype, device="cpu"):
    b, h, h_kv, d, length, pos = case
    g = torch.Generator().manual_seed(b * h + d)
    q, k, v = (torch.randn(b, n, d, generator=g) for n in (h, h_kv, h_kv))
    ang = torch.outer(torch.arange(float(max(length, *pos) + 1)), torch.rand(d // 2, generator=g))
    caches = [torch.randn(b, h_kv, length, d, generator=g) for _ in range(2)]
    return ([t.to(device, dtype) for t in (q, k, v)] + [ang.cos().to(device), ang.sin().to(device),
            torch.tensor(pos, device=device)] + [c.to(device, dtype) for c in caches])


def _check_rope(case, dtype, device):
    q, k, v, cos, sin, pos, kc, vc = _rope_inputs(case, dtype, device)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = rope_write(q, k, v, cos, sin, pos, kc, vc, impl="triton")
    exact_k, exact_v = kc_ref.double(), vc_ref.double()
    exact = reference.rope_write(q.double(), k.double(), v.double(), cos.double(), sin.double(), pos, exact_k,
                                 exact_v)
    same = reference.rope_write(q, k, v, cos, sin, pos, kc_ref, vc_ref)
    ulp = 2**-7 if dtype == torch.bfloat16 and device == "cpu" else 0.0  # as in _check_attention
    for name, ours, ref, ex in (("q", out, same, exact), ("k cache", kc, kc_ref, exact_k)):
        err, base = (ours.double() - ex).abs().max().item(), (ref.double() - ex).abs().max().item()
        assert err <= 2 * base + ulp * ex.abs().max().item() + 1e-6, (name, err, base)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0)  # values are copied, not computed


@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: "-".join(map(str, c[:5])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.interpreter
@pytest.mark.usefixtures("interpret")
def test_rope_write_matches_reference(case, dtype, monkeypatch):
    calls = _kernel_calls(monkeypatch, "rope_write")
    _check_rope(case, dtype, "cpu")
    assert calls, "the kernel was not used"


def test_reference_accepts_a_strided_sdpa_output(monkeypatch):
    """SDPA may hand back a non-contiguous [B, H_kv, G, hd] (it did on the H200 in fp32 with
    grouped queries); the reference must still return [B, H, hd] with the same values."""
    q, k, v, n, kv_len = _inputs((2, 8, 2, 32, 16, 32, [5, 32]), torch.float32)
    want = reference.decode_attention(q, k, v, n, kv_len)
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(reference.F, "scaled_dot_product_attention",
                        lambda *a, **kw: real(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2))
    got = reference.decode_attention(q, k, v, n, kv_len)
    assert got.shape == q.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_reference_rope_write_leaves_other_positions():
    """The reference itself: only position pos[b] of sequence b changes (CPU, no Triton)."""
    q, k, v, cos, sin, pos, kc, vc = _rope_inputs(ROPE_CASES[0], torch.float32)
    before = kc.clone()
    rope_write(q, k, v, cos, sin, pos, kc, vc, impl="torch")
    changed = (kc != before).any(-1).any(1)  # [B, L]
    for b, p in enumerate(pos.tolist()):
        assert changed[b].nonzero().flatten().tolist() == [p]


@pytest.mark.interpreter
@pytest.mark.usefixtures("interpret")
def test_falls_back_for_gradients_and_torch(monkeypatch):
    """A gradient to record or impl='torch' takes the reference (the kernels have no backward)."""
    q, k, v, n, kv_len = _inputs(CASES[1], torch.float32)
    calls = _kernel_calls(monkeypatch, "decode_attention")
    q.requires_grad_()
    out = decode_attention(q, k, v, n, kv_len, impl="auto")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad():
        decode_attention(q, k, v, n, kv_len, impl="torch")
    assert not calls
    with torch.no_grad():
        decode_attention(q, k, v, n, kv_len, impl="auto")
    assert calls


@pytest.mark.interpreter
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("attention", ["split_kv", "rope_sdpa"])
@pytest.mark.parametrize("kv_heads", [2, None], ids=["gqa", "mha"])
def test_model_decode_with_kernels_equals_full_forward(kv_heads, attention, monkeypatch):
    """tiny-dense's one-token steps through the kernels (``attention="split_kv"``) after a ragged
    prefill: every logit within 1e-5 of each sequence's own full forward (fp32). (Memory-layer
    models take the same attention code; under the interpreter their own kernels would take a
    minute, and the GPU tests of tests/inference cover them.)"""
    from ultramem.model.decode_state import DecodeState
    from ultramem.model.transformer import Transformer
    from ultramem.presets import get_preset

    name = "tiny-dense"
    cfg = get_preset(name).model
    if kv_heads:
        cfg.n_kv_heads = kv_heads
    model = Transformer.build(cfg).eval()
    calls = _kernel_calls(monkeypatch, "decode_attention")
    writes = _kernel_calls(monkeypatch, "rope_write")
    lens, steps = [2, 5], 3
    seqs = [torch.randint(0, cfg.vocab_size, (n + steps,)) for n in lens]
    ids = torch.zeros(2, 5, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, :n] = seqs[b][:n]
    state = DecodeState.allocate(model, 2, 12, attention=attention)
    got: list[list[torch.Tensor]] = [[], []]
    with torch.no_grad():
        model(ids, state=state, lengths=torch.tensor(lens))  # prefill: the SDPA path
        for t in range(steps):
            step = torch.stack([seq[n + t] for seq, n in zip(seqs, lens)]).view(2, 1)
            logits = model(step, state=state).logits
            for b in range(2):
                got[b].append(logits[b, 0])
        for b, n in enumerate(lens):
            ref = model(seqs[b].view(1, -1)).logits[0, n:]
            err = (torch.stack(got[b]) - ref).abs().max().item()
            assert err < 1e-5, (name, b, err)
    assert len(writes) == steps * cfg.n_layers
    assert len(calls) == (steps * cfg.n_layers if attention == "split_kv" else 0)


@pytest.mark.interpreter
@pytest.mark.usefixtures("interpret")
def test_auto_takes_split_kv_only_for_small_batches(monkeypatch):
    """``attention="auto"``: a one-token step of ``B * H_kv <= TUNING.decode_attention_max_heads``
    takes the split-KV kernel, a larger one the fused rotary + write before masked SDPA; both
    write through the rotary kernel and give the same logits (fp32)."""
    from ultramem.model.decode_state import DecodeState
    from ultramem.model.transformer import Transformer
    from ultramem.presets import get_preset

    cfg = get_preset("tiny-dense").model  # 4 key/value heads
    model = Transformer.build(cfg).eval()
    calls = _kernel_calls(monkeypatch, "decode_attention")
    writes = _kernel_calls(monkeypatch, "rope_write")
    ids = torch.randint(0, cfg.vocab_size, (2, 4))
    out = {}
    for limit in (8, 7):  # B * H_kv = 8
        state = DecodeState.allocate(model, 2, 8, attention="auto")
        assert state.kv[0].attention == "auto"
        with torch.no_grad(), tuned(decode_attention_max_heads=limit):
            model(ids[:, :3], state=state)
            out[limit] = model(ids[:, 3:], state=state).logits
        assert len(calls) == (cfg.n_layers if limit == 8 else 0)
        assert len(writes) == cfg.n_layers
        calls.clear()
        writes.clear()
    torch.testing.assert_close(out[8], out[7], rtol=1e-5, atol=1e-5)


# ---- GPU: bf16 at model sizes, CUDA graphs ---------------------------------------------------
GPU_CASES = [(1, 16, 16, 2048, 128, 2048, [2048]), (64, 16, 16, 2048, 128, 2048, None),
             (8, 12, 12, 4096, 64, 4096, None), (5, 32, 8, 1000, 128, 1000, [1, 999, 1000, 513, 64])]


def _gpu_case(case):
    if case[-1] is None:  # ragged random lengths
        g = torch.Generator().manual_seed(case[0])
        case = (*case[:-1], torch.randint(1, case[3] + 1, (case[0],), generator=g).tolist())
    return case


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c[:6])))
def test_gpu_attention_bf16(case):
    _check_attention(_gpu_case(case), torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(4, 16, 16, 128, 64, [0, 5, 63, 64]), (3, 32, 8, 128, 30, [1, 29, 7])],
                         ids=["mha", "gqa"])
def test_gpu_rope_write_bf16(case):
    _check_rope(case, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_gpu_attention_replays_in_a_cuda_graph():
    """Captured once, replayed with other lengths and queries: each replay equals the reference."""
    q, k, v, n, kv_len = _inputs((4, 16, 4, 512, 128, 512, [1, 100, 511, 512]), torch.bfloat16, "cuda")
    decode_attention(q, k, v, n, kv_len)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, n, kv_len)
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        q.copy_(torch.randn(q.shape, generator=g, device="cuda"))
        n.copy_(torch.randint(1, kv_len + 1, n.shape, generator=g, device="cuda"))
        graph.replay()
        ref = reference.decode_attention(q.float(), k.float(), v.float(), n, kv_len)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
