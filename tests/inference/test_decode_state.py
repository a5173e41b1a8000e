"""Cached decoding (DecodeState) equals the full forward for every layer type, ragged batches."""

import pytest
import torch

from ultramem.errors import ConfigError
from ultramem.model.decode_state import DecodeState
from ultramem.model.transformer import Transformer
from ultramem.presets import get_preset

TINY = ["tiny-dense", "tiny-moe", "tiny-pkm", "tiny-memory-plus", "tiny-ultramem", "tiny-ultramem-v2"]


def tiny(name: str, **model_kw) -> Transformer:
    cfg = get_preset(name).model
    for k, v in model_kw.items():
        setattr(cfg, k, v)
    model = Transformer.build(cfg).eval()
    with torch.no_grad():
        for layer in model.memory:
            conv = getattr(layer, "query_conv", None)
            if conv is not None:
                conv.weight.normal_()  # a non-trivial causal kernel, so the window matters
    return model


def decode_steps(model: Transformer, state: DecodeState, seqs: list[torch.Tensor], lens: list[int], steps: int,
                 got: list[list[torch.Tensor]]) -> None:
    """Feed each sequence's next ``steps`` tokens after its prompt of ``lens[b]``, one step at a
    time, appending each step's logits to ``got[b]``."""
    for t in range(steps):
        step = torch.stack([seq[n + t] for seq, n in zip(seqs, lens)]).view(len(seqs), 1)
        logits = model(step, state=state).logits
        for b in range(len(seqs)):
            got[b].append(logits[b, 0])


def full_logits(model: Transformer, seq: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(seq.view(1, -1)).logits[0]


@pytest.mark.parametrize("name", TINY)
def test_ragged_chunked_prefill_then_steps_equal_full_forward(name):
    """Three sequences of 3, 9 and 6 prompt tokens, right-padded, prefilled in chunks of 4, then
    five one-token steps: every logit equals each sequence's own full forward (fp32, 1e-5)."""
    model = tiny(name)
    lens = [3, 9, 6]
    seqs = [torch.randint(0, 8192, (n + 5,)) for n in lens]
    state = DecodeState.allocate(model, 3, 16)
    ids = torch.zeros(3, 9, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, :n] = seqs[b][:n]
    length = torch.tensor(lens)
    got: list[list[torch.Tensor]] = [[] for _ in lens]
    with torch.no_grad():
        for off in range(0, 9, 4):
            n = (length - off).clamp(0, 4)
            logits = model(ids[:, off:off + 4], state=state, lengths=n).logits
            for b in range(3):
                got[b] += list(logits[b, : int(n[b])])
        assert state.pos.tolist() == lens
        decode_steps(model, state, seqs, lens, 5, got)
    for b in range(3):
        ref = full_logits(model, seqs[b])
        err = (torch.stack(got[b]) - ref).abs().max().item()
        assert err < 1e-5, (name, b, err)


def test_last_only_returns_each_sequences_last_valid_token():
    model = tiny("tiny-ultramem")
    ids = torch.randint(0, 8192, (2, 7))
    lengths = torch.tensor([4, 7])
    with torch.no_grad():
        last = model(ids, state=DecodeState.allocate(model, 2, 8), lengths=lengths, last_only=True).logits
    assert last.shape == (2, 1, 8192)
    for b, n in enumerate([4, 7]):
        assert torch.allclose(last[b, 0], full_logits(model, ids[b, :n])[-1], atol=1e-5)


def test_grouped_query_heads_and_narrow_views_share_memory():
    model = tiny("tiny-dense", n_kv_heads=2)
    seq = torch.randint(0, 8192, (1, 6))
    state = DecodeState.allocate(model, 4, 8)
    view = state.narrow(1)
    assert view.kv[0].k.data_ptr() == state.kv[0].k.data_ptr()
    assert state.kv[0].k.shape == (4, 2, 8, 32)
    with torch.no_grad():
        got = torch.cat([model(seq[:, t:t + 1], state=view).logits for t in range(6)], 1)[0]
    assert torch.allclose(got, full_logits(model, seq[0]), atol=1e-5)
    assert state.pos.tolist() == [6, 0, 0, 0]


def test_reset_forgets_and_full_state_raises():
    model = tiny("tiny-ultramem")
    seq = torch.randint(0, 8192, (1, 5))
    state = DecodeState.allocate(model, 1, 5)
    with torch.no_grad():
        first = model(seq, state=state).logits
        with pytest.raises(ConfigError, match="max_len=5"):
            model(seq[:, :1], state=state)
        state.reset()
        assert state.pos.tolist() == [0]
        again = model(seq, state=state).logits
    assert torch.equal(first, again)


def test_allocate_rejects_bad_sizes():
    model = tiny("tiny-dense")
    with pytest.raises(ConfigError, match="max_seq_len=256"):
        DecodeState.allocate(model, 1, 257)
    with pytest.raises(ConfigError, match="batch=0"):
        DecodeState.allocate(model, 0, 8)


def test_allocate_resolves_and_rejects_attention(monkeypatch):
    """CPU (no interpreter): 'auto' resolves to SDPA; 'split_kv' needs the kernels; a typo is one line."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = tiny("tiny-dense")
    assert DecodeState.allocate(model, 1, 8).kv[0].attention == "sdpa"
    assert DecodeState.allocate(model, 1, 8).narrow(1).kv[0].attention == "sdpa"
    for mode in ("split_kv", "rope_sdpa"):
        with pytest.raises(ConfigError, match=f"{mode}.*CUDA"):
            DecodeState.allocate(model, 1, 8, attention=mode)
    with pytest.raises(ConfigError, match="'flash' is not one of auto, sdpa, split_kv, rope_sdpa"):
        DecodeState.allocate(model, 1, 8, attention="flash")


def _gpu_cached_vs_full(name: str, overlap: bool, attention: str, dtype: torch.dtype, tol: float) -> None:
    """Ragged prefill + four one-token steps on CUDA: every logit within ``tol`` of the largest
    full-forward logit, per sequence."""
    torch.manual_seed(0)
    model = tiny(name).cuda().to(dtype)
    lens = [3, 7]
    seqs = [torch.randint(0, 8192, (n + 4,), device="cuda") for n in lens]
    ids = torch.zeros(2, 7, dtype=torch.long, device="cuda")
    for b, n in enumerate(lens):
        ids[b, :n] = seqs[b][:n]
    state = DecodeState.allocate(model, 2, 12, overlap=overlap, attention=attention)
    assert (state.side is not None) == overlap and state.kv[0].attention == attention
    got: list[list[torch.Tensor]] = [[], []]
    with torch.no_grad():
        logits = model(ids, state=state, lengths=torch.tensor(lens, device="cuda")).logits
        for b, n in enumerate(lens):
            got[b] += list(logits[b, :n])
        decode_steps(model, state, seqs, lens, 4, got)
    for b in range(2):
        ref = full_logits(model, seqs[b]).float()
        err = (torch.stack(got[b]).float() - ref).abs().max().item()
        assert err < tol * ref.abs().max().item(), (name, overlap, attention, b, err)


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("name", TINY)
def test_gpu_bf16_cached_decoding_equals_full_forward(name, overlap):
    """bf16, one-token steps through masked SDPA (the full forward's own rounding), memory
    layers on a side stream or not: within bf16 tolerance (2 % of the largest logit)."""
    _gpu_cached_vs_full(name, overlap, "sdpa", torch.bfloat16, 0.02)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["split_kv", "rope_sdpa"])
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("name", TINY)
def test_gpu_split_kv_cached_decoding_equals_full_forward(name, overlap, attention):
    """fp32, one-token steps through the split-KV kernels: within 1e-4 of the largest logit.
    (In bf16 the tiny memory models' top-m picks another row when an attention output moves by
    an ulp, and any attention whose rounding differs from the full forward's moves it: on the CPU
    an fp32-accumulated reference attention does the same to tiny-pkm. The bf16 check of the
    kernels is per op, tests/ops/test_decode_attention.py, and tiny-dense's below.)"""
    allow = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _gpu_cached_vs_full(name, overlap, attention, torch.float32, 1e-4)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allow


@pytest.mark.gpu
def test_gpu_bf16_split_kv_dense_equals_full_forward():
    _gpu_cached_vs_full("tiny-dense", False, "split_kv", torch.bfloat16, 0.02)
