"""Packed projections (``ultramem.layers.packed``): q/k/v and SwiGLU gate/up as views of one
buffer give the same logits and the same state dict, and unpack themselves when a weight is
replaced."""

from __future__ import annotations

import pytest
import torch

from ultramem.inference.engine import Engine
from ultramem.inference.sampling import Sampling
from ultramem.layers.packed import packed
from ultramem.model.transformer import Transformer
from ultramem.resolve import load_config


def _model(preset: str, **over) -> Transformer:
    cfg = load_config(preset).model
    cfg.dropout = 0.0
    for k, v in over.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return Transformer.build(cfg, "cpu").eval()


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-ultramem-v2"])
def test_packed_projections_same_logits_and_state(preset):
    model = _model(preset)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        before = model(idx).logits
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.pack_projections()
    attn = model.blocks[0].attn
    assert packed(attn, (attn.q_proj, attn.k_proj, attn.v_proj)) is not None
    ffn = model.blocks[0].ffn
    gated = getattr(ffn, "gate_proj", None) is not None
    assert gated == (preset == "tiny-ultramem-v2")  # the SwiGLU host
    if gated:
        assert packed(ffn, (ffn.gate_proj, ffn.up_proj)) is not None
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    calls = []
    real = torch.nn.functional.linear
    torch.nn.functional.linear = lambda x, w, *a: calls.append(tuple(w.shape)) or real(x, w, *a)
    try:
        with torch.no_grad():
            after = model(idx).logits
    finally:
        torch.nn.functional.linear = real
    d = model.cfg.d_model
    assert (attn.q_proj.out_features + 2 * attn.k_proj.out_features, d) in calls  # one GEMM for q, k, v
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert sd.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # gradients still reach each parameter: training takes the three separate projections
    model.train()
    model(idx, targets=idx).loss.backward()
    assert attn.k_proj.weight.grad is not None and attn.k_proj.weight.grad.abs().sum() > 0


def test_replaced_weight_unpacks():
    model = _model("tiny-dense")
    model.pack_projections()
    attn = model.blocks[0].attn
    lins = (attn.q_proj, attn.k_proj, attn.v_proj)
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach().clone() * 2)
    assert packed(attn, lins) is None  # the stale buffer is dropped, not used
    idx = torch.randint(0, model.cfg.vocab_size, (1, 5))
    with torch.no_grad():
        y = model(idx).logits
    ref = _model("tiny-dense")
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(y, ref(idx).logits)


def test_engine_packs_when_asked_and_greedy_tokens_are_unchanged():
    model = _model("tiny-dense")
    prompts = [[1, 2, 3], [4, 5]]
    plain = Engine(model, 2, 32, Sampling(0.0), graphs=False, pack=False).generate_ids(prompts, 6)
    attn = model.blocks[0].attn
    assert packed(attn, (attn.q_proj, attn.k_proj, attn.v_proj)) is None
    eng = Engine(model, 2, 32, Sampling(0.0), graphs=False, pack=True)
    assert packed(attn, (attn.q_proj, attn.k_proj, attn.v_proj)) is not None
    assert eng.generate_ids(prompts, 6).ids == plain.ids
