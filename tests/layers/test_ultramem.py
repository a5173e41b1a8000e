"""UltraMem (v1) layer: every math.md §3 mechanism checked against its definition."""

import dataclasses
import math

import pytest
import torch

from ultramem.errors import ConfigError
from ultramem.layers.memory_common import value_lr_multiplier
from ultramem.layers.pkm import PKMConfig
from ultramem.layers.registry import ShapeContext
from ultramem.layers.tdqkr import TuckerCores
from ultramem.layers.ultramem import UltraMemConfig
from ultramem.ops.retrieval.reference import brute_force_topk, tucker_topk
from ultramem.presets.ablation import rung_memory

SHAPE = ShapeContext(d_model=32, n_layers=4, n_mem_layers=1)
SMALL = dict(knum=8, key_dim=16, heads=2, topk=4, value_dim=16, calib_samples=128)


def build(shape=SHAPE, seed=0, **kw):
    cfg = UltraMemConfig(**{**SMALL, **kw})
    cfg.validate(shape, "model.memory")
    torch.manual_seed(seed)
    with torch.device("meta"):
        layer = cfg.build(shape)
    layer.to_empty(device="cpu")
    layer.init_weights()
    return layer


# ---- TDQKR (math.md §3.7) ---------------------------------------------------------------------
def _tucker_case(cores: torch.Tensor, s_row: torch.Tensor, s_col: torch.Tensor, k: int, m: int):
    tc = TuckerCores(cores.shape[0], cores.shape[1])
    with torch.no_grad():
        tc.cores.copy_(cores)
        tc.u.zero_()
        tc.v.zero_()
        tc.refresh()
    scores, addr = tucker_topk(s_row, s_col, tc.cores, tc.u, tc.v, k, m)
    full = torch.einsum("tar,crs,tbs->tab", s_row, cores, s_col)  # exact summed scores [T, N, N]
    ref_scores, ref_addr = brute_force_topk(full, m)
    return tc, scores, addr, ref_scores, ref_addr


def test_tdqkr_rank1_core_with_positive_phase1_scores_is_exact():
    n, r, k, m = 24, 3, 6, 6
    a, b = torch.rand(r) + 0.1, torch.rand(r) + 0.1
    cores = torch.stack([0.7 * torch.outer(a, b), 0.3 * torch.outer(a, b)])  # summed core rank 1, sigma > 0
    s_row, s_col = torch.rand(10, n, r), torch.rand(10, n, r)  # positive, so S u > 0
    tc, scores, addr, ref_scores, ref_addr = _tucker_case(cores, s_row, s_col, k, m)
    assert (s_row @ tc.u > 0).all() and (s_col @ tc.v > 0).all()
    assert torch.equal(addr.sort(-1).values, ref_addr.sort(-1).values)
    assert torch.allclose(scores.sum(-1), ref_scores, atol=1e-5)


def test_tdqkr_general_core_recall_against_brute_force():
    """A general core is an approximation (math.md §3.7). With a core whose second singular value
    is at the aux-loss margin (sigma_2 / sigma_1 = 0.15) and Gaussian scores, the rank-1 phase 1
    keeps the largest positive factors; the top-m products of two large negative factors are
    lost, so about half of the exact top-m may be missed. Floors: recall >= 0.4 for such a core,
    and a near-rank-1 core must not do worse than that."""
    torch.manual_seed(1)
    n, r, k, m = 32, 2, 16, 16
    s_row, s_col = torch.randn(64, n, r), torch.randn(64, n, r)
    q, _ = torch.linalg.qr(torch.randn(r, r))
    w, _ = torch.linalg.qr(torch.randn(r, r))
    core = (q @ torch.diag(torch.tensor([1.0, 0.15])) @ w.T).unsqueeze(0)
    _, _, addr, _, ref_addr = _tucker_case(core, s_row, s_col, k, m)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(addr, ref_addr)) / ref_addr.numel()
    assert 0.4 <= recall < 1.0, recall
    # with positive scores (what the phase-1 ranking assumes) the same core is near exact
    s_row, s_col = s_row.abs(), s_col.abs()
    core = core.abs()
    _, _, addr, _, ref_addr = _tucker_case(core, s_row, s_col, k, m)
    recall_pos = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(addr, ref_addr)) / ref_addr.numel()
    assert recall_pos >= 0.9, recall_pos


def test_svd_sign_is_stable_between_refreshes():
    torch.manual_seed(0)
    tc = TuckerCores(2, 3)
    tc.reset_parameters()
    for _ in range(20):
        u0, v0 = tc.u.clone(), tc.v.clone()
        with torch.no_grad():
            tc.cores.add_(1e-3 * torch.randn_like(tc.cores))
        tc.refresh()
        assert torch.dot(u0, tc.u) > 0.99 and torch.dot(v0, tc.v) > 0.99
    # the previous sign wins even when it is the "non-canonical" one
    with torch.no_grad():
        tc.u.neg_()
        tc.v.neg_()
    u0 = tc.u.clone()
    tc.refresh()
    assert torch.allclose(tc.u, u0, atol=1e-5)


def test_after_optimizer_step_refreshes_u_v():
    layer = build()
    t = layer.retrieval.tucker
    with torch.no_grad():
        t.cores.copy_(torch.diag(torch.tensor([0.1, 2.0])).expand_as(t.cores) / 2)
    layer.after_optimizer_step(1)
    assert abs(abs(float(t.u[1])) - 1) < 1e-5 and abs(abs(float(t.v[1])) - 1) < 1e-5


def test_aux_loss_zero_for_rank1_positive_above_margin_and_reaches_cores():
    tc = TuckerCores(2, 2)
    with torch.no_grad():
        tc.cores.copy_(torch.stack([torch.outer(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0]))] * 2))
    assert tc.aux_loss(0.001, 0.15).item() == pytest.approx(0.0, abs=1e-8)
    with torch.no_grad():
        tc.cores.copy_(torch.stack([torch.diag(torch.tensor([1.0, 0.5]))] * 2) / 2)
    loss = tc.aux_loss(0.001, 0.15)
    assert loss.item() == pytest.approx(0.001 * (0.5 - 0.15) ** 2, rel=1e-4)
    loss.backward()
    assert tc.cores.grad is not None and tc.cores.grad.abs().sum() > 0
    # in the layer: applied in training, gradients reach the cores through the aux loss
    layer = build(aux_alpha=1.0, aux_tau=0.0)
    layer(torch.randn(2, 3, 32))
    aux, _ = layer.pop_aux()
    aux["tucker_aux"].backward()
    assert layer.retrieval.tucker.cores.grad.abs().sum() > 0
    layer.eval()
    layer(torch.randn(2, 3, 32))
    assert layer.pop_aux()[0] == {}


# ---- IVE (math.md §3.6) -----------------------------------------------------------------------
def test_ive_equals_materialised_virtual_table():
    layer = build(expansion=4, tucker_rank=0, cores=1, value_dim=8)
    e, dv, d, dv2 = 4, 8, 32, 12
    torch.manual_seed(3)
    a_g = torch.randn(e, dv, dv2) / math.sqrt(dv)  # one projector per virtual block
    w_o = torch.randn(d, dv2) / math.sqrt(dv2)  # output projection of the virtual values
    with torch.no_grad():
        layer.out_proj.weight.copy_(torch.cat([w_o @ a_g[g].T for g in range(e)], dim=1))
    x = torch.randn(2, 5, d, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    gx, gv = x.grad.clone(), layer.values.grad.clone()
    # naive: materialise V_g = V A_g, concatenate in block order, look up pi(addr)
    x2 = x.detach().clone().requires_grad_(True)
    values = layer.values.detach().clone().requires_grad_(True)
    virtual = torch.cat([values @ a_g[g] for g in range(e)])  # [E * P, D_v']
    h = layer.query_conv(x2)
    scores, addr = layer.retrieval(h.reshape(-1, d))
    pi = layer.perm[addr.reshape(10, -1)].long()
    w = scores.reshape(10, -1)  # virtual row of (g, rho) is g * P + rho = pi(addr)
    y2 = ((w.unsqueeze(-1) * virtual[pi]).sum(1) @ w_o.T).view(2, 5, d)
    y2.square().sum().backward()
    assert torch.allclose(y, y2, atol=1e-5)
    assert torch.allclose(gx, x2.grad, atol=1e-4)
    assert torch.allclose(gv, values.grad, atol=1e-4)


def test_permutation_is_saved_and_seeded():
    a, b, c = build(expansion=4, seed=5), build(expansion=4, seed=5), build(expansion=4, seed=6)
    assert "perm" in a.state_dict()
    assert torch.equal(a.perm, b.perm) and not torch.equal(a.perm, c.perm)
    assert torch.equal(a.perm.long().sort().values, torch.arange(a.perm.numel()))
    c.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 32)
    assert torch.equal(c.perm, a.perm) and torch.allclose(a(x), c(x))


# ---- MCS (math.md §3.8) -----------------------------------------------------------------------
def test_multi_core_scoring_equals_per_core_formula():
    layer = build(expansion=1, tucker_rank=2, cores=2, value_dim=16, per_rank_query=True)
    d = 32
    x = torch.randn(1, 6, d)
    y = layer(x)
    h = layer.query_conv(x).reshape(-1, d)
    s_row, s_col = layer.retrieval.per_rank_scores(h)  # [Q, T, G, N, r]
    s_all = torch.stack([x.transpose(0, 1).reshape(6, 2, *x.shape[3:]) for x in (s_row, s_col)], 2)
    cores = layer.retrieval.tucker.cores
    _, addr = layer.retrieval(h)
    n = layer.cfg.n_keys()
    out = torch.zeros(6, 16)
    for t in range(6):
        for hd in range(2):
            for j in range(layer.cfg.topk):
                a, b = divmod(int(addr[t, hd, j]), n)
                row, col = s_all[t, hd, 0, a], s_all[t, hd, 1, b]
                for c in range(2):
                    s_c = row @ cores[c] @ col  # S_row[a]^T C_c S_col[b]
                    out[t, c * 8:(c + 1) * 8] += s_c * layer.values[a * n + b, c * 8:(c + 1) * 8]
    assert torch.allclose(y.reshape(6, d), out @ layer.out_proj.weight.T, atol=1e-4)


# ---- init (math.md §3.9) ----------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(tucker_rank=0, cores=1), dict(expansion=1, heads=4)])
def test_improved_init_mean_score_and_output_std(kw):
    shape = ShapeContext(d_model=64, n_layers=6, n_mem_layers=1)
    layer = build(shape, knum=16, key_dim=32, topk=8, value_dim=32, calib_samples=512, **kw)
    layer.track_metrics = True
    x = torch.randn(4, 128, 64)
    with torch.no_grad():
        y = layer(x)
    _, metrics = layer.pop_aux()
    assert abs(float(metrics["score_mean"]) - 1) <= 0.1
    target = layer.target_output_std()
    assert abs(y.std().item() / target - 1) <= 0.2, (y.std().item(), target)


def test_value_lr_multiplier_schedule_and_hint():
    fn = value_lr_multiplier(10.0, 0.5)
    total = 1000
    assert fn(0, total) == pytest.approx(10.0)
    assert fn(125, total) == pytest.approx(10.0 - 9 * 0.25)
    assert fn(250, total) == pytest.approx(5.5)  # T_d / 2
    assert fn(500, total) == pytest.approx(1.0)
    assert fn(900, total) == pytest.approx(1.0)
    layer = build()
    (hint,) = layer.param_group_hints()
    assert len(hint.params) == 1 and hint.params[0] is layer.values and hint.weight_decay == 0.0
    assert hint.lr_multiplier(0, 100) == pytest.approx(10.0)


# ---- query conv (math.md §3.11), causality, determinism -----------------------------------------
def test_query_conv_causal_and_decode_state_matches_full():
    layer = build(query_conv=3)
    with torch.no_grad():
        layer.query_conv.weight.normal_()  # a non-trivial kernel
    x = torch.randn(2, 7, 32)
    full = layer(x)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 3, 32)
    assert torch.allclose(layer(x2)[:, :4], full[:, :4], atol=1e-6)  # causal
    state = layer.new_state(2, x.device, x.dtype)
    steps = [layer(x[:, t:t + 1], state) for t in range(7)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    state2 = layer.new_state(2, x.device, x.dtype)
    chunks = torch.cat([layer(x[:, :3], state2), layer(x[:, 3:], state2)], 1)
    assert torch.allclose(chunks, full, atol=1e-5)


def test_deterministic_for_a_seed():
    x = torch.randn(2, 5, 32)
    assert torch.equal(build(seed=11)(x), build(seed=11)(x))


def test_metrics_only_on_request():
    layer = build(metrics_window=2)
    layer(torch.randn(2, 4, 32))
    assert layer.pop_aux()[1] == {}
    layer.track_metrics = True
    covs = []
    for _ in range(3):
        layer(torch.randn(2, 4, 32))
        m = layer.pop_aux()[1]
        covs.append(m["coverage"])
        assert {"score_mean", "score_std", "coverage", "tucker_sv0", "tucker_sv1", "tucker_aux"} <= set(m)
    assert 0 < covs[0] < covs[1] <= 1 and covs[2] < covs[1]  # window of 2 forwards, then reset


@pytest.mark.parametrize("kw,field", [
    (dict(topk=20, k=4), "topk"),
    (dict(value_dim=15, cores=2), "value_dim"),
    (dict(expansion=2), "expansion"),
    (dict(heads=3, share_query=True), "share_query"),
    (dict(tucker_rank=0, cores=2), "cores"),
    (dict(query_norm="bn"), "query_norm"),
])
def test_bad_configs_raise(kw, field):
    with pytest.raises(ConfigError, match=f"model.memory.{field}"):
        UltraMemConfig(**{**SMALL, **kw}).validate(SHAPE, "model.memory")


# ---- PKM equivalence of the ladder's first rung ----------------------------------------------
def test_all_switches_off_equals_pkm_layer():
    cfg = rung_memory(0)
    shape = ShapeContext(d_model=32, n_layers=2, n_mem_layers=1)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    mine = build(shape, **{**fields, "knum": 8, "key_dim": 16, "heads": 2, "topk": 4, "value_dim": 0})
    pkm = PKMConfig(placement="1:1", n_keys=8, key_dim=16, heads=2, topk=4).build(shape)
    pkm.init_weights()
    with torch.no_grad():
        pkm.retrieval.query_proj.weight.copy_(mine.retrieval.query_proj.weight)
        pkm.retrieval.keys.copy_(mine.retrieval.keys)  # one layout: [2, H, N, 1, K]
        pkm.values.copy_(mine.values)
        pkm.retrieval.query_norm.weight.copy_(mine.retrieval.query_norm.weight)
        pkm.retrieval.query_norm.bias.copy_(mine.retrieval.query_norm.bias)
    x = torch.randn(3, 5, 32)
    assert torch.allclose(mine(x), pkm(x), atol=1e-5)
    assert mine.cfg.num_params(shape) == PKMConfig(n_keys=8, key_dim=16, heads=2, topk=4).num_params(shape)
    (hint,) = mine.param_group_hints()
    assert hint.lr == 1e-3 and hint.constant_lr


def test_normed_keys_cached_at_inference_and_refreshed_on_change():
    """Eval + no_grad reuses the normalised key table; an update of the keys or the key norm's
    gain, or a mode switch, recomputes it; training never caches."""
    layer = build().eval()
    ret = layer.retrieval
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        first = layer(x)
        k1 = ret.normed_keys(torch.float32)
        assert ret.normed_keys(torch.float32) is k1  # cached
        torch.testing.assert_close(k1, ret.key_norm(ret.keys))
        ret.keys.mul_(1.5)  # in-place update: a new version
        k2 = ret.normed_keys(torch.float32)
        assert k2 is not k1
        torch.testing.assert_close(k2, ret.key_norm(ret.keys))
        ret.key_norm.weight.add_(0.25)
        torch.testing.assert_close(ret.normed_keys(torch.float32), ret.key_norm(ret.keys))
        assert not torch.equal(layer(x), first)
        ret.keys.data.mul_(2.0)  # bypasses the version counter; a mode switch drops the cache
        layer.train().eval()
        torch.testing.assert_close(ret.normed_keys(torch.float32), ret.key_norm(ret.keys))
    layer.train()
    with torch.no_grad():
        ret.normed_keys(torch.float32)
    assert ret._key_cache is None
