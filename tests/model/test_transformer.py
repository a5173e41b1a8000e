"""Host transformer: causality for every layer type, decoding with the state dict, variants."""

import pytest
import torch
import torch.nn.functional as F

from ultramem.model.decode_state import DecodeState
from ultramem.model.transformer import Transformer
from ultramem.presets import preset_names
from ultramem.resolve import load_config

TINY = [n for n in preset_names() if n.startswith("tiny-")]


def _model(name: str, *overrides: str) -> Transformer:
    torch.manual_seed(0)
    cfg = load_config(name, overrides=["model.n_layers=3", "model.vocab_size=97", *overrides])
    model = Transformer.build(cfg.model)
    return model.eval()


def _placement_for_3_blocks(name: str) -> list[str]:
    cfg = load_config(name)
    if cfg.model.memory is None:
        return []
    return ["model.memory.placement=full" if cfg.model.memory.placement == "full" else "model.memory.placement=1:2/3:3"]


@pytest.mark.parametrize("name", TINY)
def test_causality_every_layer_type(name):
    """Perturbing token t changes no output before t (eval mode: no dropout, BN running stats)."""
    model = _model(name, *_placement_for_3_blocks(name))
    idx = torch.randint(0, 97, (2, 12))
    t = 7
    with torch.no_grad():
        base = model(idx).logits
        idx2 = idx.clone()
        idx2[:, t] = (idx2[:, t] + 1) % 97
        pert = model(idx2).logits
    assert torch.allclose(base[:, :t], pert[:, :t], atol=1e-5)
    assert not torch.allclose(base[:, t:], pert[:, t:], atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_decode_with_state_equals_full_forward(name):
    model = _model(name, *_placement_for_3_blocks(name))
    idx = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        full = model(idx).logits
        state = DecodeState.allocate(model, 2, 10)
        prefill = model(idx[:, :6], state=state).logits
        steps = [model(idx[:, i : i + 1], state=state).logits for i in range(6, 10)]
    got = torch.cat([prefill, *steps], dim=1)
    assert torch.allclose(full, got, atol=1e-4), (full - got).abs().max()


def test_cached_grouped_query_decoding_takes_a_strided_sdpa_output(monkeypatch):
    """The cached path folds grouped query heads into SDPA's query length; SDPA may return that
    as a strided tensor (fp32 on CUDA), which the path must accept: same logits as the full forward."""
    import ultramem.model.attention as attention

    model = _model("tiny-dense", "model.n_kv_heads=2")
    idx = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        full = model(idx).logits
        real = F.scaled_dot_product_attention
        monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                            lambda *a, **kw: real(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2))
        state = DecodeState.allocate(model, 2, 8)
        prefill = model(idx[:, :5], state=state).logits
        steps = [model(idx[:, i : i + 1], state=state).logits for i in range(5, 8)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides, check", [
    (["model.n_kv_heads=2"], lambda m: m.blocks[0].attn.k_proj.weight.shape == (2 * 32, 128)),
    (["model.ffn.activation=swiglu"], lambda m: m.blocks[0].ffn.gate_proj is not None),
    (["model.tie_embeddings=false"], lambda m: m.lm_head is not None),
    (["model.norm=rmsnorm"], lambda m: isinstance(m.norm, torch.nn.RMSNorm)),
])
def test_variants_run_and_backprop(overrides, check):
    """Each variant is built as asked, every parameter gets a gradient, and the gradient is the
    loss's derivative: a central difference along it (fp64) matches ``|g|^2``."""
    model = _model("tiny-dense", *overrides).train().double()
    assert check(model)
    idx = torch.randint(0, 97, (2, 8))

    def loss_fn() -> torch.Tensor:  # ModelOutput.loss is fp32; the check needs fp64
        out = model(idx, targets=idx)
        assert out.loss is not None and out.loss.item() == pytest.approx(loss64(out.logits).item(), rel=1e-6)
        return loss64(out.logits)

    def loss64(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), idx.flatten())

    loss_fn().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    grads = [p.grad.clone() for p in params]
    eps = 1e-6

    def loss_at(sign: float) -> float:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(sign * eps * g)
            out = loss_fn().item()
            for p, g in zip(params, grads):
                p.sub_(sign * eps * g)
        return out

    directional = (loss_at(1.0) - loss_at(-1.0)) / (2 * eps)
    assert directional == pytest.approx(sum(float(g.square().sum()) for g in grads), rel=1e-4)


def test_memory_output_lands_after_block_j():
    """A 1:3 memory layer's output must not reach block 2's input (it is added after block 3)."""
    model = _model("tiny-pkm", "model.memory.placement=1:3")
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, a, o: None)
    mem = model.memory[0]
    orig = mem.forward

    def spy(x, state=None):
        y = orig(x, state)
        seen["y"] = y
        return y

    mem.forward = spy
    inputs = {}
    model.blocks[1].input_layernorm.register_forward_hook(lambda m, a, o: inputs.__setitem__(2, a[0].clone()))
    model.norm.register_forward_hook(lambda m, a, o: inputs.__setitem__("final", a[0].clone()))
    idx = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        model(idx)
        mem.forward = lambda x, state=None: torch.zeros_like(orig(x, state))
        inputs_zero = dict(inputs)
        model(idx)
    assert torch.allclose(inputs_zero[2], inputs[2])  # block 2 unaffected by the memory output
    assert not torch.allclose(inputs_zero["final"], inputs["final"])  # but the residual is


def test_aux_losses_collected_once():
    model = _model("tiny-moe").train()
    idx = torch.randint(0, 97, (2, 8))
    out = model(idx)
    assert sorted(out.aux_losses) == [f"blocks.{i}.ffn.balance" for i in range(3)]
    assert torch.equal(out.aux_loss, sum(out.aux_losses.values())) and out.aux_loss > 0
    again = model(idx)  # the same input: refreshed, not accumulated (would be 2x)
    assert torch.equal(again.aux_loss, out.aux_loss)
    assert all(not layer._aux_losses for layer in model.sparse_layers())
    assert model.eval()(idx).aux_loss is None  # balance loss only in training

@pytest.mark.parametrize("name", ["tiny-pkm", "tiny-ultramem", "tiny-ultramem-v2"])
def test_forward_is_a_loop_over_callable_blocks(name):
    """Calling ``model.blocks[i]`` and the memory layers by the wiring plan reproduces the model
    exactly, and every block is entered through ``Block.forward`` once (what FSDP/compile wrap)."""
    model = _model(name, *_placement_for_3_blocks(name))
    calls = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, a: calls.append(m.index))
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        want = model(idx).logits
        assert calls == [1, 2, 3]
        x, pending = model.embed_tokens(idx), {}
        for block in model.blocks:
            x, h = block(x)
            for n in model.wiring.reads(block.index):
                pending.setdefault(model.wiring.spans[n].dst, []).append(model.memory[n](h))
            for y in pending.pop(block.index, []):
                x = x + y
        got = F.linear(model.norm(x), model.embed_tokens.weight)
    assert len(model.memory) > 0 and torch.equal(got, want)
