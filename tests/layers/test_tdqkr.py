"""PKM / Memory+ retrieval is TDQKR with the Tucker core off (layers/tdqkr.py, math.md §2).

``OldProductKeyRetrieval`` is a copy of the module PKM and Memory+ used before they shared
:class:`MemoryRetrieval` (``layers/product_keys.py`` at 5d32449, keys ``[H, 2, N, K]``): the
tests prove the merged path draws the same weights for a seed, computes the same scores,
addresses and gradients on random inputs, and loads state dicts saved in the old layout.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ultramem import checkpoint
from ultramem.layers.memory_plus import MemoryPlusConfig
from ultramem.layers.norm import make_norm
from ultramem.layers.pkm import PKMConfig
from ultramem.layers.registry import ShapeContext
from ultramem.layers.tdqkr import PK_QUERY_NORMS, MemoryRetrieval, RetrievalSpec, product_key_spec
from ultramem.model.transformer import Transformer
from ultramem.ops.retrieval.reference import product_key_topk
from ultramem.resolve import load_config

D, H, N, K, M = 24, 3, 10, 8, 6
SHAPE = ShapeContext(d_model=D, n_layers=2, n_mem_layers=1)


class OldProductKeyRetrieval(nn.Module):
    """``x [T, D] -> (scores [T, H, m], addr [T, H, m])``: the pre-merge code path."""

    def __init__(self, d_model: int, heads: int, n_keys: int, key_dim: int, m: int, k: int,
                 query_norm: str) -> None:
        super().__init__()
        self.heads, self.n_keys, self.key_dim, self.m, self.k = heads, n_keys, key_dim, m, k
        self.query_proj = nn.Linear(d_model, heads * 2 * key_dim, bias=False)
        self.query_norm = make_norm(query_norm, heads * 2 * key_dim if query_norm == "batchnorm" else key_dim)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, key_dim))  # [H, row/col, N, K]

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.query_proj.weight, std=std)
        bound = 1.0 / math.sqrt(self.key_dim)
        nn.init.uniform_(self.keys, -bound, bound)
        if hasattr(self.query_norm, "reset_parameters"):
            self.query_norm.reset_parameters()
        if isinstance(self.query_norm, nn.BatchNorm1d):
            self.query_norm.reset_running_stats()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = x.shape[0]
        q = self.query_proj(x)
        if isinstance(self.query_norm, nn.BatchNorm1d):
            q = self.query_norm(q)
        q = q.view(t, self.heads, 2, self.key_dim)
        if isinstance(self.query_norm, nn.LayerNorm):
            q = self.query_norm(q)
        keys = self.keys.to(q.dtype)
        s_row = torch.einsum("thk,hnk->thn", q[:, :, 0], keys[:, 0])
        s_col = torch.einsum("thk,hnk->thn", q[:, :, 1], keys[:, 1])
        return product_key_topk(s_row, s_col, self.k, self.m)


def old_and_new(query_norm: str, k: int = 4, seed: int = 0) -> tuple[OldProductKeyRetrieval, MemoryRetrieval]:
    """Both modules initialised from the same seed (the new one with the PKM draw order)."""
    old = OldProductKeyRetrieval(D, H, N, K, M, k, query_norm)
    cfg = PKMConfig(n_keys=N, key_dim=K, heads=H, topk=M, k=k, query_norm=query_norm)
    new = MemoryRetrieval(product_key_spec(cfg, D), impl="torch")
    torch.manual_seed(seed)
    old.init_weights(0.3)
    torch.manual_seed(seed)
    new.init_weights(0.3, head_major_keys=True)
    return old, new


@pytest.mark.parametrize("query_norm", PK_QUERY_NORMS)
def test_same_seed_same_weights_and_next_draw(query_norm):
    old, new = old_and_new(query_norm)
    assert torch.equal(new.query_proj.weight, old.query_proj.weight)
    assert new.keys.shape == (2, H, N, 1, K)
    assert torch.equal(new.keys, old.keys.transpose(0, 1).unsqueeze(3))
    # the RNG stream is where the old init left it: the layer's next draws (values) match too
    torch.manual_seed(5)
    old.init_weights(0.3)
    after_old = torch.randn(7)
    torch.manual_seed(5)
    new.init_weights(0.3, head_major_keys=True)
    assert torch.equal(torch.randn(7), after_old)


@pytest.mark.parametrize("query_norm", PK_QUERY_NORMS)
def test_outputs_and_gradients_match_the_old_path(query_norm):
    torch.manual_seed(1)
    old, new = old_and_new(query_norm, seed=3)
    with torch.no_grad():  # non-trivial norm affine, so its gradients are compared too
        for a, b in zip(old.query_norm.parameters(), new.query_norm.parameters(), strict=True):
            a.uniform_(0.5, 1.5)
            b.copy_(a)
    x_old = torch.randn(9, D, requires_grad=True)
    x_new = x_old.detach().clone().requires_grad_(True)
    s_old, a_old = old(x_old)
    s_new, a_new = new(x_new)
    assert s_new.shape == (9, H, M, 1)
    assert torch.equal(a_new, a_old)
    torch.testing.assert_close(s_new[..., 0], s_old, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(s_old)
    (s_old * g).sum().backward()
    (s_new[..., 0] * g).sum().backward()
    torch.testing.assert_close(x_new.grad, x_old.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new.query_proj.weight.grad, old.query_proj.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new.keys.grad, old.keys.grad.transpose(0, 1).unsqueeze(3), rtol=1e-5, atol=1e-6)
    assert new.keys.grad.abs().sum() > 0
    for a, b in zip(old.query_norm.parameters(), new.query_norm.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)
    for a, b in zip(old.query_norm.buffers(), new.query_norm.buffers(), strict=True):  # BatchNorm stats
        torch.testing.assert_close(b, a)


def test_tucker_switched_off_is_product_key_retrieval():
    """An UltraMem-style retrieval spec with the TDQKR switches off (rank 0, no shared queries, no
    key norm, no query conv) is the product-key retrieval: same scores and addresses as the old
    module with the same weights, for every product-key query norm and phase-1 k."""
    for query_norm in PK_QUERY_NORMS:
        for k in (3, N):
            spec = RetrievalSpec(d_model=D, heads=H, share_query=False, key_dim=K, n_keys=N, tucker_rank=0,
                                 per_rank_query=False, cores=1, query_norm=query_norm, key_norm="none",
                                 topk=M, k=k, query_conv=0)
            tdqkr = MemoryRetrieval(spec, impl="torch")
            assert tdqkr.tucker is None and tdqkr.spec.sub_keys == 1
            old = OldProductKeyRetrieval(D, H, N, K, M, k, query_norm)
            old.init_weights(0.5)
            tdqkr.load_state_dict(old.state_dict())  # old layout, through the upgrade hook
            x = torch.randn(11, D)
            s_new, a_new = tdqkr(x)
            s_old, a_old = old(x)
            assert torch.equal(a_new, a_old)
            torch.testing.assert_close(s_new[..., 0], s_old, rtol=1e-6, atol=1e-6)
            assert spec.params() == sum(p.numel() for p in old.parameters())


def test_old_layout_state_dict_loads_into_pkm_and_memory_plus():
    for cfg in (PKMConfig(placement="1:1", n_keys=N, key_dim=K, heads=H, topk=M, query_norm="layernorm", impl="torch"),
                MemoryPlusConfig(placement="1:1", n_keys=N, key_dim=K, heads=H, topk=M, impl="torch")):
        shared = cfg.build_shared(SHAPE)
        layer = cfg.build(SHAPE, shared)
        if shared is not None:
            shared.init_weights()
        layer.init_weights()
        old_state = {k: v.clone() for k, v in layer.state_dict().items()}
        old_state["retrieval.keys"] = layer.retrieval.keys.detach()[:, :, :, 0].transpose(0, 1).clone()
        assert old_state["retrieval.keys"].shape == (H, 2, N, K)
        x = torch.randn(2, 5, D)
        want = layer(x)
        fresh = cfg.build(SHAPE, shared)
        fresh.init_weights()
        assert not torch.equal(fresh(x), want)
        fresh.load_state_dict(old_state)  # strict
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)


def test_old_layout_checkpoint_weights_load_into_a_model():
    """``checkpoint.load_model_weights`` (resume, inference, export) takes a pre-merge PKM
    checkpoint: its shape check sees the upgraded layout."""
    cfg = load_config("tiny-pkm", overrides=["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                                              "model.memory.placement=1:1", "model.memory.impl=torch"]).model
    torch.manual_seed(0)
    model = Transformer.build(cfg)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    names = [k for k in old if k.endswith("retrieval.keys")]
    assert names
    for k in names:
        old[k] = old[k][:, :, :, 0].transpose(0, 1).contiguous()  # [H, 2, N, K]
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    want = model.eval()(tokens).logits
    torch.manual_seed(1)
    other = Transformer.build(cfg)
    checkpoint.load_model_weights(other, old, "old-ckpt")
    torch.testing.assert_close(other.eval()(tokens).logits, want, rtol=0, atol=0)
    wrong = dict(old)
    wrong[names[0]] = old[names[0]][:, :, :-1]  # a real mismatch is still refused
    with pytest.raises(checkpoint.CheckpointError, match="weight shapes do not fit"):
        checkpoint.load_model_weights(other, wrong, "bad-ckpt")


def test_pkm_accounting_is_the_spec_accounting():
    for query_norm in PK_QUERY_NORMS:
        cfg = PKMConfig(placement="1:1", n_keys=N, key_dim=K, heads=H, topk=M, query_norm=query_norm)
        layer = cfg.build(SHAPE)
        assert cfg.num_params(SHAPE) == sum(p.numel() for p in layer.parameters())
        mp = MemoryPlusConfig(placement="1:1", n_keys=N, key_dim=K, heads=H, topk=M, query_norm=query_norm)
        shared = mp.build_shared(SHAPE)
        assert mp.num_params(SHAPE) == sum(p.numel() for p in mp.build(SHAPE, shared).parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["pkm", "memory_plus"])
def test_product_key_layers_on_the_kernels_equal_the_reference_gpu(kind):
    """On CUDA the merged retrieval runs the kernel paths (key scores, phase-1 top-k, lookup;
    the skinny-linear query projection at one decode row): outputs and gradients equal
    ``impl="torch"`` with the same weights, in training and at decode."""
    shape = ShapeContext(d_model=64, n_layers=2, n_mem_layers=1)
    kw = dict(placement="1:1", n_keys=64, key_dim=32, heads=2, topk=8)
    layers = {}
    for impl in ("torch", "triton"):
        cfg = (PKMConfig(query_norm="layernorm", impl=impl, **kw) if kind == "pkm"
               else MemoryPlusConfig(impl=impl, **kw))
        torch.manual_seed(0)
        shared = cfg.build_shared(shape)
        if shared is not None:
            shared.init_weights()
            shared.cuda()
        layer = cfg.build(shape, shared).cuda()
        layer.init_weights()
        layers[impl] = layer
    x = torch.randn(3, 16, 64, device="cuda")
    outs, grads = {}, {}
    for impl, layer in layers.items():
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(torch.ones_like(y))
        outs[impl], grads[impl] = y, xi.grad
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-4, atol=1e-4)
    g_t, g_r = layers["triton"].retrieval.keys.grad, layers["torch"].retrieval.keys.grad
    assert g_r.abs().sum() > 0
    torch.testing.assert_close(g_t, g_r, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # decode: one token, eval mode (cached normed keys, skinny linear)
        one = x[:1, :1]
        torch.testing.assert_close(layers["triton"].eval()(one), layers["torch"].eval()(one),
                                   rtol=1e-4, atol=1e-4)


def test_old_layout_optimizer_state_resumes_training():
    """A pre-merge PKM checkpoint also resumes *training*: AdamW's moments of the keys, saved as
    ``[H, 2, N, K]``, are upgraded like the weights when the optimiser state is loaded
    (``distributed.load_optimizer_state``), and the next step equals the uninterrupted one."""
    from ultramem import distributed

    cfg = load_config("tiny-pkm", overrides=["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                                              "model.memory.placement=1:1", "model.memory.impl=torch"]).model
    torch.manual_seed(0)
    model = Transformer.build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    model(tokens, targets=tokens).loss.backward()
    opt.step()
    saved_w = {k: v.clone() for k, v in model.state_dict().items()}
    saved_o = copy.deepcopy(opt.state_dict())
    names = [n for n, _ in model.named_parameters()]
    old_o = copy.deepcopy(saved_o)
    for i, n in enumerate(names):
        if n.endswith("retrieval.keys"):
            for f in ("exp_avg", "exp_avg_sq"):
                old_o["state"][i][f] = old_o["state"][i][f][:, :, :, 0].transpose(0, 1).contiguous()
    assert any(v["exp_avg"].dim() == 4 for v in old_o["state"].values())

    def next_loss(weights, optim_state):
        torch.manual_seed(1)
        m = Transformer.build(cfg)
        checkpoint.load_model_weights(m, weights, "ckpt")
        o = torch.optim.AdamW(m.parameters(), lr=1e-2)
        distributed.load_optimizer_state(m, o, optim_state)
        m.zero_grad()
        m(tokens, targets=tokens).loss.backward()
        o.step()
        return m(tokens, targets=tokens).loss

    torch.testing.assert_close(next_loss(saved_w, old_o), next_loss(saved_w, saved_o), rtol=0, atol=0)
