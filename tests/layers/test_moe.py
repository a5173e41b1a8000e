import torch
import torch.nn.functional as F

from ultramem.layers.moe import MoEConfig, route, sort_by_expert, switch_balance_loss
from ultramem.layers.registry import ShapeContext


def test_balance_loss_hand_computed():
    # 4 tokens, 2 experts, top-1. Assignments: e0, e0, e0, e1 -> f = [3/4, 1/4].
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    topk = torch.tensor([[0], [0], [0], [1]])
    # P = mean probs = [0.65, 0.35]; loss = 2 * (0.75*0.65 + 0.25*0.35) = 1.15
    assert torch.isclose(switch_balance_loss(probs, topk, 2), torch.tensor(1.15))
    # uniform routing gives exactly 1
    uni = torch.full((4, 4), 0.25)
    assert torch.isclose(switch_balance_loss(uni, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), 4), torch.tensor(1.0))


def test_every_token_reaches_exactly_k_experts():
    logits = torch.randn(37, 8)
    _, _, experts = route(logits, 3, normalize=False)
    order, token_of, counts = sort_by_expert(experts, 8)
    assert torch.equal(torch.bincount(token_of, minlength=37), torch.full((37,), 3))
    assert counts.sum() == 37 * 3
    # distinct experts per token, sorted assignments grouped by expert
    assert all(len(set(row.tolist())) == 3 for row in experts)
    assert torch.equal(experts.flatten()[order], experts.flatten()[order].sort().values)


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


def test_moe_matches_naive_definition_and_grads_flow():
    for cfg in (MoEConfig(n_experts=6, top_k=2, hidden=24),
                MoEConfig(n_experts=5, top_k=3, hidden=16, activation="swiglu", n_shared=1, normalize_top_k=True,
                          z_loss_weight=1e-3)):
        layer = cfg.build(ShapeContext(d_model=32, n_layers=2))
        layer.init_weights()
        x = torch.randn(2, 9, 32)
        y = layer(x)
        assert torch.allclose(y, _naive(layer, x), atol=1e-5)
        aux, _ = layer.pop_aux()
        assert "balance" in aux and (cfg.z_loss_weight == 0) == ("z_loss" not in aux)
        (y.square().sum() + sum(aux.values())).backward()
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
        assert layer.w_up.grad.abs().sum() > 0
