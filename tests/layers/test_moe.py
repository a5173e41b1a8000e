import pytest
import torch
import torch.nn.functional as F

from ultramem.errors import ConfigError
from ultramem.layers.moe import (
    MoEConfig,
    dispatch,
    expert_counts,
    grouped_mm_available,
    route,
    sort_by_expert,
    switch_balance_loss,
)
from ultramem.layers.registry import ShapeContext

SHAPE = ShapeContext(d_model=32, n_layers=2)
CONFIGS = (
    dict(n_experts=6, top_k=2, hidden=24),
    dict(n_experts=5, top_k=3, hidden=16, activation="swiglu", n_shared=1, normalize_top_k=True, z_loss_weight=1e-3),
)
needs_grouped = pytest.mark.skipif(not grouped_mm_available(torch.device("cpu"), torch.float32),
                                   reason="this torch build has no CPU torch._grouped_mm")


def test_balance_loss_hand_computed():
    # 4 tokens, 2 experts, top-1. Assignments: e0, e0, e0, e1 -> f = [3/4, 1/4].
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    topk = torch.tensor([[0], [0], [0], [1]])
    # P = mean probs = [0.65, 0.35]; loss = 2 * (0.75*0.65 + 0.25*0.35) = 1.15
    assert torch.isclose(switch_balance_loss(probs, topk, 2), torch.tensor(1.15))
    # uniform routing gives exactly 1
    uni = torch.full((4, 4), 0.25)
    assert torch.isclose(switch_balance_loss(uni, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), 4), torch.tensor(1.0))


def test_balance_loss_equals_bincount_definition():
    probs = torch.randn(50, 7).softmax(-1)
    topk = probs.topk(3, -1).indices
    f = torch.bincount(topk.flatten(), minlength=7).float() / topk.numel()
    assert torch.allclose(switch_balance_loss(probs, topk, 7), 7 * (f * probs.mean(0)).sum())
    assert torch.equal(expert_counts(topk, 7), torch.bincount(topk.flatten(), minlength=7))


@pytest.mark.parametrize("skew", [0.0, 6.0])
def test_dispatch_is_dropless(skew):
    logits = torch.randn(37, 8)
    logits[:, 0] += skew  # skew: expert 0 in every token's top-3, experts 6 and 7 in none
    logits[:, 6:] -= skew
    _, _, experts = route(logits, 3, normalize=False)
    d = dispatch(experts, 8)
    assert torch.equal(torch.bincount(d.token_of, minlength=37), torch.full((37,), 3))
    assert d.counts.sum() == 37 * 3 and torch.equal(d.counts, torch.bincount(experts.flatten(), minlength=8))
    assert torch.equal(d.offs.long(), d.counts.cumsum(0))
    assert all(len(set(row.tolist())) == 3 for row in experts)  # distinct experts per token
    sorted_ids = experts.flatten()[d.order]
    assert torch.equal(sorted_ids, sorted_ids.sort().values)  # grouped by expert
    assert torch.equal(d.order[d.inverse], torch.arange(37 * 3))
    assert torch.equal(d.token_of, d.order // 3)
    order, token_of, counts = sort_by_expert(experts, 8)
    assert torch.equal(order, d.order) and torch.equal(counts, d.counts)
    if skew:
        assert d.counts[0] == 37 and (d.counts == 0).any()


def _naive(layer, x):
    """Per-token, per-selected-expert loop: the definition."""
    flat = x.reshape(-1, x.shape[-1])
    probs, gates, experts = route(layer.router(flat), layer.cfg.top_k, layer.cfg.normalize_top_k)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(layer.cfg.top_k):
            e = experts[t, j]
            h = flat[t] @ layer.w_up[e]
            h = F.silu(flat[t] @ layer.w_gate[e]) * h if layer.w_gate is not None else F.gelu(h)
            out[t] += gates[t, j] * (h @ layer.w_down[e])
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(flat)
    return out.view(x.shape)


def _layers(cfg: dict, impls):
    out = {}
    for impl in impls:
        torch.manual_seed(1)
        layer = MoEConfig(**cfg, impl=impl).build(SHAPE)
        layer.init_weights()
        out[impl] = layer
    return out


def _run(layer, x):
    """Output, and the gradient of the input and of every parameter (aux losses included)."""
    x = x.clone().requires_grad_(True)
    y = layer(x)
    aux, _ = layer.pop_aux()
    (y.float().square().sum() + sum(aux.values())).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    grads["x"] = x.grad
    return y, aux, grads


@pytest.mark.parametrize("cfg", CONFIGS)
def test_loop_matches_naive_definition(cfg):
    layer = _layers(cfg, ["loop"])["loop"]
    x = torch.randn(2, 9, 32)
    assert torch.allclose(layer(x), _naive(layer, x), atol=1e-5)
    aux, _ = layer.pop_aux()
    assert "balance" in aux and (cfg.get("z_loss_weight", 0) == 0) == ("z_loss" not in aux)


@pytest.mark.parametrize("skew", [0.0, 4.0])
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("impl", [pytest.param("grouped_mm", marks=needs_grouped), "gather"])
def test_path_matches_loop_outputs_and_every_gradient(impl, cfg, skew):
    layers = _layers(cfg, [impl, "loop"])
    x = torch.randn(3, 7, 32)
    if skew:  # one expert takes most tokens; some experts get none
        w0 = layers["loop"].router.weight[0].detach()
        x = x + skew * w0 / w0.norm()
    results = {k: _run(layer, x) for k, layer in layers.items()}
    (y, aux, grads), (y_ref, aux_ref, grads_ref) = results[impl], results["loop"]
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert aux.keys() == aux_ref.keys() and all(torch.allclose(aux[k], aux_ref[k]) for k in aux)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads_ref[name].abs().sum() > 0, name
        assert torch.allclose(grads[name], grads_ref[name], atol=1e-5, rtol=1e-4), name
    if skew:
        _, _, experts = route(layers["loop"].router(x.reshape(-1, 32)), cfg["top_k"], False)
        counts = expert_counts(experts, cfg["n_experts"])
        assert counts.max() >= x.shape[0] * x.shape[1] * 0.9


def test_auto_picks_gather_for_few_tokens_and_grouped_for_many():
    layer = MoEConfig(n_experts=8, top_k=2, hidden=16, gather_max=8).build(SHAPE)
    cpu = torch.device("cpu")
    assert layer.path_for(4, cpu, torch.float32) == "gather"
    expected = "grouped" if grouped_mm_available(cpu, torch.float32) else "loop"
    assert layer.path_for(5, cpu, torch.float32) == expected
    assert MoEConfig(impl="loop").build(SHAPE).path_for(1, cpu, torch.float32) == "loop"


def test_widths_grouped_mm_cannot_stride_take_the_loop_or_raise(monkeypatch):
    """torch._grouped_mm needs 16-byte row strides (bf16: widths a multiple of 8): an unaligned
    expert width takes the loop under impl='auto' (with a warning) and is a one-line
    ConfigError under impl='grouped_mm', instead of CUDA's stride error inside the product."""
    import ultramem.layers.moe as moe

    monkeypatch.setattr(moe, "grouped_mm_available", lambda device, dtype: True)
    cpu = torch.device("cpu")
    aligned = MoEConfig(n_experts=4, top_k=2, hidden=16, gather_max=0).build(SHAPE)
    assert aligned.path_for(8, cpu, torch.bfloat16) == "grouped"
    odd = MoEConfig(n_experts=4, top_k=2, hidden=20, gather_max=0).build(SHAPE)
    assert odd.path_for(8, cpu, torch.float32) == "grouped"  # fp32: multiples of 4 suffice
    with pytest.warns(UserWarning, match="hidden=20"):
        assert odd.path_for(8, cpu, torch.bfloat16) == "loop"
    strict = MoEConfig(n_experts=4, top_k=2, hidden=20, gather_max=0, impl="grouped_mm").build(SHAPE)
    with pytest.raises(ConfigError, match="multiples of 8 in torch.bfloat16 \\(hidden=20; pick multiples of 8\\)"):
        strict.path_for(8, cpu, torch.bfloat16)


@needs_grouped
def test_autocast_fp32_input_takes_grouped_path_in_bf16():
    """The block input is fp32 under autocast: the layer must still take the grouped path,
    computing in bf16 (the autocast dtype), and agree with the loop in bf16."""
    layers = _layers(CONFIGS[1], ["auto", "loop"])
    x = torch.randn(2, 16, 32)
    assert layers["auto"].path_for(x.shape[0] * x.shape[1], x.device, torch.bfloat16) == "grouped"
    ys = {}
    for impl, layer in layers.items():
        with torch.autocast("cpu", torch.bfloat16):
            ys[impl] = layer(x)
    assert ys["auto"].dtype == torch.bfloat16
    err = (ys["auto"].float() - ys["loop"].float()).norm() / ys["loop"].float().norm()
    assert err < 2e-2


@needs_grouped
@pytest.mark.parametrize("n_tokens", [2, 24])  # gather path, grouped path
def test_compiles_without_graph_breaks(n_tokens):
    """fullgraph=True fails on any graph break; aot_eager traces the backward too (bf16: the
    grouped_mm meta kernel accepts no other dtype)."""
    layer = _layers(CONFIGS[1], ["auto"])["auto"].to(torch.bfloat16)
    x = torch.randn(1, n_tokens, 32, dtype=torch.bfloat16, requires_grad=True)
    y_eager = layer(x)  # fills the grouped_mm probe cache outside tracing
    layer.pop_aux()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    aux, _ = layer.pop_aux()
    (y.sum() + sum(aux.values())).backward()
    assert torch.allclose(y, y_eager, atol=1e-2) and layer.w_up.grad.abs().sum() > 0


def test_bad_configs_raise_one_line_errors():
    for bad in (dict(impl="fast"), dict(top_k=40), dict(activation="relu"), dict(gather_max=-1)):
        with pytest.raises(ConfigError):
            MoEConfig(**bad).validate(SHAPE, "model.ffn")


@needs_grouped
def test_col_layout_of_the_bf16_weight_copy_changes_nothing():
    layers = {lay: _layers({**CONFIGS[1], "grouped_layout": lay}, ["auto"])["auto"] for lay in ("row", "col")}
    x = torch.randn(2, 16, 32)
    out = {}
    for lay, layer in layers.items():
        with torch.autocast("cpu", torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
        out[lay] = [y] + [p.grad for p in layer.parameters()]
    assert layers["col"]._weights(torch.bfloat16)[0].stride()[1] == 1  # N-major copy
    for a, b in zip(out["row"], out["col"]):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
