"""UltraMemV2 layer (math.md §4): PEER-style values, ring sharing of one pool, principled init."""

import math

import pytest
import torch
import torch.nn.functional as F
from v2_helpers import SMALL, D, build_all

from ultramem.errors import ConfigError
from ultramem.layers.mlp import MLPConfig
from ultramem.layers.registry import ShapeContext
from ultramem.layers.ultramem_v2 import UltraMemV2Config


def test_ring_address_map_small_numbers():
    # 4 layers x P = 4 rows -> P_all = 16; share_ratio 0.5 -> window P' = 8
    cfg = UltraMemV2Config(knum=2, share_ratio=0.5)
    shape = ShapeContext(d_model=D, n_layers=4, n_mem_layers=4)
    assert cfg.pool_rows(shape) == 16 and cfg.window(shape) == 8
    local = torch.arange(8)
    layers = {ring: build_all(n_mem=4, n_layers=4, knum=2, topk=2, share_ratio=0.5, ring=ring)[2]
              for ring in ("forward", "centred")}

    def ring_rows(layer: int, ring: str) -> list[int]:  # the layers' own map, local -> pool row
        _, rows = layers[ring][layer].pool_rows_for(local)
        return rows.tolist()

    assert ring_rows(0, "forward") == list(range(8))
    assert ring_rows(1, "forward") == list(range(4, 12))
    assert ring_rows(3, "forward") == [12, 13, 14, 15, 0, 1, 2, 3]  # wraps
    # centred: the window starts (P' - P) / 2 = 2 rows before the layer's own table
    assert ring_rows(0, "centred") == [14, 15, 0, 1, 2, 3, 4, 5]
    assert ring_rows(2, "centred") == list(range(6, 14))
    # share_ratio 1: every layer sees the whole pool
    full = UltraMemV2Config(knum=2, share_ratio=1.0)
    assert full.window(shape) == 16
    # logical addresses beyond the window fold onto it: addr mod P'
    assert full.keys_per_side(shape) == 4 and cfg.keys_per_side(shape) == 3


def test_layers_draw_from_one_pool_within_their_window():
    cfg, pool, layers = build_all(n_mem=3, share_ratio=0.5)
    p, p_all, window = cfg.rows(), 3 * cfg.rows(), layers[0].window
    assert pool.values.shape[0] == p_all and window == round(0.5 * p_all)
    x = torch.randn(2, 16, D)
    for i, layer in enumerate(layers):
        assert layer.pool is pool
        _, addr = layer.retrieval(x.reshape(-1, D))
        local, rows = layer.pool_rows_for(addr)
        allowed = {(i * p + j) % p_all for j in range(window)}
        assert set(rows.flatten().tolist()) <= allowed
        assert (local < window).all()
    pool.values.grad = None
    layers[2](x).sum().backward()
    assert pool.values.grad.abs().sum() > 0 and pool.pre_values.grad.abs().sum() > 0
    hints = [h for layer in layers for h in layer.param_group_hints()]
    assert len(hints) == 1 and hints[0].params == [pool.values, pool.pre_values]
    assert hints[0].weight_decay == 0.0 and hints[0].lr_multiplier(0, 10) == 1.0


def test_forward_equals_peer_formula():
    """y = W_o sum_j phi(<W_pre x, U[rho_j]>) s_j^(c) V[rho_j][slice c] (math.md §4.2)."""
    for activation in ("identity", "gelu"):
        cfg, pool, layers = build_all(n_mem=2, activation=activation, cores=2, heads=2)
        layer = layers[1]
        x = torch.randn(1, 5, D)
        y = layer(x).reshape(5, D)
        flat = x.reshape(5, D)
        scores, addr = layer.retrieval(flat)
        _, rows = layer.pool_rows_for(addr.reshape(5, -1))
        s = scores.reshape(5, -1, 2)
        phi = F.gelu if activation == "gelu" else (lambda z: z)
        out = torch.zeros(5, 12)
        for t in range(5):
            pq = layer.pre_proj.weight @ flat[t]
            for j in range(rows.shape[1]):
                r = rows[t, j]
                a = phi(pq @ pool.pre_values[r])
                for c in range(2):
                    out[t, c * 6:(c + 1) * 6] += a * s[t, j, c] * pool.values[r, c * 6:(c + 1) * 6]
        assert torch.allclose(y, out @ layer.out_proj.weight.T, atol=1e-5)


def test_separate_k_and_m_and_per_rank_queries():
    cfg, _, layers = build_all(n_mem=2, topk=20, k=5, per_rank_query=True)
    spec = layers[0].retrieval.spec
    assert spec.k == 5 and spec.topk == 20 and spec.query_ranks == 2
    scores, addr = layers[0].retrieval(torch.randn(7, D))
    assert scores.shape == (7, 1, 20, 2) and addr.shape == (7, 1, 20)
    shape = ShapeContext(d_model=D, n_layers=3, n_mem_layers=2)
    n_built = sum(p.numel() for p in layers[0].parameters())
    assert n_built == cfg.num_params(shape)
    assert UltraMemV2Config().k == 0 and UltraMemV2Config(topk=300).spec(shape).k == 128  # V2 cap


def test_principled_init_matches_ffn_branch_variance():
    n_layers, hidden = 4, 96
    shape_kw = dict(ffn_hidden=hidden, ffn_gated=True)
    cfg, pool, layers = build_all(
        n_mem=n_layers, n_layers=n_layers, shape_kw=shape_kw, knum=12, topk=16, value_dim=24,
        pre_value_dim=8, calib_samples=512,
    )
    x = torch.randn(8, 128, D)
    std = cfg.linear_std(ShapeContext(d_model=D, n_layers=n_layers))
    ffn = MLPConfig(hidden=hidden, activation="swiglu", init_std=std).build(ShapeContext(d_model=D, n_layers=n_layers))
    ffn.init_weights()
    with torch.no_grad():
        ffn_var = ffn(x).var().item()
        mem_var = sum(layer(x).var().item() for layer in layers) / n_layers
        scores, _ = layers[0].retrieval(x.reshape(-1, D))
    assert abs(scores.mean().item() - 1) <= 0.1
    assert abs(mem_var / ffn_var - 1) <= 0.2, (mem_var, ffn_var)
    expected = cfg.ffn_variance(ShapeContext(d_model=D, n_layers=n_layers, **shape_kw))
    assert abs(ffn_var / expected - 1) <= 0.1  # the closed form used for the value std


def test_causal_and_deterministic():
    _, _, layers = build_all(n_mem=2, query_conv=3, seed=4)
    _, _, again = build_all(n_mem=2, query_conv=3, seed=4)
    x = torch.randn(2, 6, D)
    y = layers[1](x)
    assert torch.equal(y, again[1](x))
    x2 = x.clone()
    x2[:, 3:] += 1.0
    assert torch.allclose(layers[1](x2)[:, :3], y[:, :3], atol=1e-6)
    state = layers[1].new_state(2, x.device, x.dtype)
    steps = torch.cat([layers[1](x[:, t:t + 1], state) for t in range(6)], 1)
    assert torch.allclose(steps, y, atol=1e-5)


def test_metrics_on_request():
    _, _, layers = build_all(n_mem=2)
    layers[0].track_metrics = True
    layers[0](torch.randn(2, 8, D))
    _, m = layers[0].pop_aux()
    assert {"score_mean", "score_std", "coverage", "tucker_sv0"} <= set(m)
    assert 0 < m["coverage"] <= 1


@pytest.mark.parametrize("kw,field", [
    (dict(share_ratio=0.0), "share_ratio"),
    (dict(share_ratio=1.5), "share_ratio"),
    (dict(topk=30, k=5), "topk"),
    (dict(value_dim=13, cores=2), "value_dim"),
    (dict(ring="backward"), "ring"),
    (dict(activation="relu6"), "activation"),
])
def test_bad_configs_raise(kw, field):
    with pytest.raises(ConfigError, match=f"model.memory.{field}"):
        UltraMemV2Config(**{**SMALL, **kw}).validate(ShapeContext(d_model=D, n_layers=3, n_mem_layers=3), "model.memory")


def test_value_std_formula_matches_paper_when_ffn_variance_is_papers():
    """sigma_V^4 = 0.2 k D / (m H (1 + s^2) D_p D_v L) when sigma_ffn^2 = 0.064 k / (2L) (math.md §4.5)."""
    d, n_layers, hidden = 768, 20, 2496
    cfg = UltraMemV2Config(knum=8, key_dim=16, topk=32, heads=1, value_dim=192, pre_value_dim=192)
    shape = ShapeContext(d_model=d, n_layers=n_layers, n_mem_layers=20, ffn_hidden=hidden, ffn_gated=True)
    k_inner = hidden / d
    cfg.ffn_variance = lambda s: 0.064 * k_inner / (2 * n_layers)  # type: ignore[method-assign]
    paper = (0.2 * k_inner * d / (32 * 1 * 1.3 * 192 * 192 * n_layers)) ** 0.25
    assert cfg.value_std(shape, 0.3) == pytest.approx(paper, rel=1e-6)
    assert math.isclose(cfg.linear_std(shape), 0.02282177322938192, rel_tol=1e-9)


def test_pre_value_query_reads_the_block_input_not_the_query_conv(monkeypatch):
    """math.md §4.2: a_j = phi(<W_pre x, U[rho_j]>); the query conv feeds only the retrieval."""
    import ultramem.layers.ultramem_v2 as v2

    _, _, layers = build_all(n_mem=2, query_conv=3, seed=5)
    layer = layers[0]
    with torch.no_grad():  # the conv starts as the identity; make it mix tokens
        layer.query_conv.weight.normal_()
    seen = {}
    real = v2.skinny_linear

    def spy(x, weight, impl="auto"):
        if weight is layer.pre_proj.weight:
            seen["in"] = x
        return real(x, weight, impl=impl)

    monkeypatch.setattr(v2, "skinny_linear", spy)
    x = torch.randn(2, 7, layer.pre_proj.in_features)
    layer(x)
    assert torch.equal(seen["in"], x.reshape(-1, x.shape[-1]))
