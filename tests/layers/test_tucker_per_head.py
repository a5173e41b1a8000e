"""``tucker_per_head`` (math.md §3.7; issue 13 item 1): one set of Tucker cores and one ``u, v``
per retrieval head, as the authors' code keeps them, against a plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from ultramem.errors import ConfigError
from ultramem.layers.registry import ShapeContext
from ultramem.layers.ultramem import UltraMemConfig
from ultramem.layers.ultramem_v2 import UltraMemV2Config

SHAPE = ShapeContext(d_model=48, n_layers=4, n_mem_layers=1)
SMALL = dict(knum=12, key_dim=16, heads=2, topk=6, k=5, value_dim=24, calib_samples=64, impl="torch")


def config(cls=UltraMemConfig, **kw):
    cfg = cls(**{**SMALL, **(dict(expansion=4) if cls is UltraMemConfig else {}), **kw})
    cfg.validate(SHAPE, "model.memory")
    return cfg


def build(cls=UltraMemConfig, seed=0, **kw):
    """A layer (and its shared pool for V2, else None), weights initialised from ``seed``."""
    cfg = config(cls, **kw)
    torch.manual_seed(seed)
    shared = cfg.build_shared(SHAPE) if hasattr(cfg, "build_shared") else None
    if shared is not None:
        shared.init_weights()
    layer = cfg.build(SHAPE, shared)
    layer.init_weights()
    return layer


def reference_retrieval(retrieval, x):
    """Plain PyTorch, written from math.md §3.7-3.8 with per-head cores: per head h, phase 1
    keeps the top-k of ``S_row u_h`` and ``S_col v_h``, the k x k candidates are scored
    exactly with every core of head h, the top-m by the summed score win. -> ``(scores
    [T, H, m, h_c], addr [T, H, m])``."""
    spec, tk = retrieval.spec, retrieval.tucker
    s_row, s_col = retrieval.per_rank_scores(x)  # [Q, T, G, N, r]
    q_groups, t, g_size, n, _ = s_row.shape
    scores, addrs = [], []
    for h in range(spec.heads):
        rows, cols = s_row[h // g_size, :, h % g_size], s_col[h // g_size, :, h % g_size]  # [T, N, r]
        i_r = (rows @ tk.u[h]).topk(spec.k, dim=-1).indices  # [T, k]
        i_c = (cols @ tk.v[h]).topk(spec.k, dim=-1).indices
        ra = torch.stack([rows[i, i_r[i]] for i in range(t)])  # [T, k, r]
        cb = torch.stack([cols[i, i_c[i]] for i in range(t)])
        per_core = torch.stack([ra @ core @ cb.transpose(1, 2) for core in tk.cores[h]], -1)  # [T, k, k, h_c]
        flat = per_core.reshape(t, spec.k * spec.k, -1)
        best = flat.sum(-1).topk(spec.topk, dim=-1).indices  # [T, m]
        scores.append(torch.stack([flat[i, best[i]] for i in range(t)]))
        addrs.append(i_r.gather(1, best // spec.k) * n + i_c.gather(1, best % spec.k))
    return torch.stack(scores, 1), torch.stack(addrs, 1)


@pytest.mark.parametrize("share_query", [True, False])
def test_per_head_retrieval_matches_the_reference_with_gradients(share_query):
    layer = build(tucker_per_head=True, share_query=share_query, heads=4 if share_query else 3)
    r = layer.retrieval.double()  # fp64: the two paths sum in different orders
    with torch.no_grad():  # make the heads' cores clearly different
        r.tucker.cores.add_(0.5 * torch.randn_like(r.tucker.cores))
    r.tucker.refresh()
    x = torch.randn(20, SHAPE.d_model, dtype=torch.float64)
    scores, addr = r(x)
    want_s, want_a = reference_retrieval(r, x)
    assert scores.shape == (20, r.spec.heads, 6, 2)
    torch.testing.assert_close(addr, want_a, rtol=0, atol=0)
    torch.testing.assert_close(scores, want_s)
    w = torch.randn_like(scores)
    params = [r.query_proj.weight, r.keys, r.tucker.cores]
    got = torch.autograd.grad((scores * w).sum(), params, retain_graph=True)
    ref = torch.autograd.grad((want_s * w).sum(), params)
    for a, b in zip(got, ref):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b)
    # each head uses its own cores: a head's cores get gradient only from that head's scores
    g0 = torch.autograd.grad((scores[:, 0] * w[:, 0]).sum(), r.tucker.cores)[0]
    assert g0[0].abs().sum() > 0 and g0[1:].abs().sum() == 0


def test_equal_per_head_cores_give_exactly_the_shared_result():
    shared = build(seed=1)
    per_head = build(seed=1, tucker_per_head=True)
    state = {k: v for k, v in shared.state_dict().items() if ".tucker." not in k}
    per_head.load_state_dict(state, strict=False)
    ts, tp = shared.retrieval.tucker, per_head.retrieval.tucker
    with torch.no_grad():
        tp.cores.copy_(ts.cores.expand_as(tp.cores))
        tp.u.copy_(ts.u.expand_as(tp.u))
        tp.v.copy_(ts.v.expand_as(tp.v))
    x = torch.randn(2, 9, SHAPE.d_model)
    y_shared, y_per_head = shared(x), per_head(x)
    torch.testing.assert_close(y_per_head, y_shared, rtol=0, atol=0)
    torch.testing.assert_close(per_head.pop_aux()[0], shared.pop_aux()[0], rtol=0, atol=0)  # aux loss too
    g = torch.randn_like(y_shared)
    (gs,) = torch.autograd.grad(y_shared, ts.cores, g)
    (gp,) = torch.autograd.grad(y_per_head, tp.cores, g)
    torch.testing.assert_close(gp.sum(0), gs)  # the shared core's gradient is the heads' sum
    tp.refresh()  # refreshing the equal cores keeps the shared u, v
    torch.testing.assert_close(tp.u, ts.u.expand_as(tp.u))


@pytest.mark.parametrize("init", ["improved", "authors"])
def test_per_head_init_draws_each_head_like_the_shared_core(init):
    layer = build(tucker_per_head=True, init=init, heads=4)
    tk = layer.retrieval.tucker
    assert tk.cores.shape == (4, 2, 2, 2) and tk.u.shape == tk.v.shape == (4, 2)
    assert not torch.equal(tk.cores[0], tk.cores[1])  # independent draws
    if init == "authors":
        assert 0.0 <= tk.cores.min().item() and tk.cores.max().item() <= 1.0
    else:  # shared base + 0.1 noise per core, / h_c: a head's two cores are close, heads are not
        c = tk.cores
        assert (c[:, 0] - c[:, 1]).abs().mean() < 0.5 * (c[0] - c[1]).abs().mean()
    for h in range(4):
        svd = torch.linalg.svd(tk.cores[h].sum(0))
        assert abs(torch.dot(tk.u[h], svd.U[:, 0]).item()) == pytest.approx(1.0, abs=1e-5)
        assert abs(torch.dot(tk.v[h], svd.Vh[0]).item()) == pytest.approx(1.0, abs=1e-5)
    sv = tk.singular_values()
    assert sv.shape == (4, 2)
    want = 0.001 * torch.relu(sv[:, 1:] - 0.15).pow(2).mean()  # over every head, as the authors' code
    torch.testing.assert_close(tk.aux_loss(0.001, 0.15), want)


def test_per_head_refresh_keeps_each_heads_sign():
    tk = build(tucker_per_head=True).retrieval.tucker
    before_u, before_v = tk.u.clone(), tk.v.clone()
    with torch.no_grad():
        tk.cores.add_(1e-3 * torch.randn_like(tk.cores))
    tk.refresh()
    assert ((tk.u * before_u).sum(-1) + (tk.v * before_v).sum(-1) > 0).all()
    with torch.no_grad():
        tk.u[1].neg_()
        tk.v[1].neg_()
    flipped = tk.u.clone()
    tk.refresh()  # head 1 follows its (flipped) previous sign, head 0 keeps its own
    torch.testing.assert_close(tk.u, flipped)


@pytest.mark.parametrize("cls", [UltraMemConfig, UltraMemV2Config])
def test_accounting_counts_per_head_cores(cls):
    for per_head in (False, True):
        cfg = config(cls, tucker_per_head=per_head)
        shared = cfg.build_shared(SHAPE) if hasattr(cfg, "build_shared") else None
        pooled = {id(p) for p in shared.parameters()} if shared is not None else set()
        layer = cfg.build(SHAPE, shared)
        assert cfg.num_params(SHAPE) == sum(p.numel() for p in layer.parameters() if id(p) not in pooled)
    off, on = config(cls), config(cls, tucker_per_head=True)
    extra = (2 - 1) * 2 * 2 * 2  # (H - 1) extra sets of h_c = 2 cores of r x r = 2 x 2
    assert on.num_params(SHAPE) - off.num_params(SHAPE) == extra
    assert on.active_params(SHAPE) - off.active_params(SHAPE) == extra
    assert on.flops_per_token(SHAPE) == off.flops_per_token(SHAPE)  # same rescoring work per head


def test_per_head_v2_trains_and_reports_metrics():
    layer = build(UltraMemV2Config, tucker_per_head=True, aux_alpha=0.001)
    layer.track_metrics = True
    x = torch.randn(2, 8, SHAPE.d_model)
    y = layer(x)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    aux, metrics = layer.pop_aux()
    assert aux["tucker_aux"].requires_grad
    assert layer.retrieval.tucker.cores.grad[1].abs().sum() > 0
    assert {"tucker_sv0", "tucker_sv1", "tucker_aux"} <= set(metrics)


@pytest.mark.parametrize("cls", [UltraMemConfig, UltraMemV2Config])
def test_per_head_without_tucker_is_a_one_line_config_error(cls):
    cfg = cls(**{**SMALL, "tucker_rank": 0, "cores": 1, "tucker_per_head": True})
    with pytest.raises(ConfigError, match=r"model.memory.tucker_per_head=true needs Tucker scoring") as e:
        cfg.validate(SHAPE, "model.memory")
    assert "\n" not in str(e.value)

