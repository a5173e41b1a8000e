"""MoE on the GPU: grouped_mm equals the loop (bf16, skewed routing with empty experts), the
whole model step captures in a CUDA graph and replays equal to eager, and a training step
never synchronises with the host."""

import pytest
import torch

from ultramem.config import ModelConfig
from ultramem.layers.moe import MoEConfig
from ultramem.layers.registry import ShapeContext
from ultramem.model.transformer import Transformer

DEV = "cuda"


def _model(**moe) -> Transformer:
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, max_seq_len=256, dropout=0.0,
                      ffn=MoEConfig(n_experts=8, top_k=2, hidden=64, activation="swiglu", z_loss_weight=1e-3, **moe))
    torch.manual_seed(0)
    return Transformer.build(cfg, device=DEV)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("skew", [0.0, 3.0])
def test_grouped_mm_matches_loop(activation, skew):
    shape = ShapeContext(d_model=256, n_layers=2)
    layers = {}
    for impl in ("grouped_mm", "loop"):
        torch.manual_seed(0)
        layer = MoEConfig(n_experts=16, top_k=4, hidden=128, activation=activation, impl=impl).build(shape).to(DEV)
        layer.init_weights()
        layers[impl] = layer
    x = torch.randn(4, 333, 256, device=DEV)
    if skew:  # most tokens to a few experts; several experts get no token at all
        w = layers["loop"].router.weight.detach()
        x = x + skew * (w[:4].sum(0) - w[8:].sum(0)) / w[0].norm()
    out = {}
    for impl, layer in layers.items():
        with torch.autocast(DEV, torch.bfloat16):
            y = layer(x)
        y.float().square().mean().backward()
        out[impl] = [y.float()] + [p.grad.float().clone() for p in layer.parameters()]
    for got, ref in zip(out["grouped_mm"], out["loop"]):
        err = (got - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < 2e-2, err
    if skew:  # an empty expert's weight gradient is exactly zero, not left-over memory
        with torch.autocast(DEV, torch.bfloat16):
            probs = layers["loop"].router(x.reshape(-1, 256)).float().softmax(-1)
        empty = torch.ones(16, dtype=torch.bool, device=DEV)
        empty[probs.topk(4, -1).indices.flatten()] = False
        assert empty.any()
        assert (layers["grouped_mm"].w_up.grad[empty] == 0).all()


def _train_step(model, idx, tgt):
    with torch.autocast(DEV, torch.bfloat16):
        out = model(idx, tgt)
        loss = out.loss + out.aux_loss
    loss.backward()
    return loss


@pytest.mark.gpu
def test_training_step_captures_in_a_cuda_graph_and_replays_equal_to_eager():
    model = _model()
    idx = torch.randint(0, 512, (4, 64), device=DEV)
    tgt = torch.randint(0, 512, (4, 64), device=DEV)
    params = list(model.parameters())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            for p in params:
                p.grad = None
            eager_loss = _train_step(model, idx, tgt).detach().clone()
    torch.cuda.current_stream().wait_stream(stream)
    eager_grads = [p.grad.clone() for p in params]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for p in params:
            p.grad.zero_()
        static_loss = _train_step(model, idx, tgt)
    for p in params:
        p.grad.fill_(123.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(static_loss, eager_loss, rtol=1e-3)
    for p, g in zip(params, eager_grads):
        assert torch.allclose(p.grad, g, rtol=1e-2, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 64])  # the gather path, the grouped path
def test_decode_step_captures_and_replays_equal_to_eager(batch):
    model = _model().to(torch.bfloat16).eval()
    layer = model.blocks[0].ffn
    assert layer.path_for(batch, torch.device(DEV), torch.bfloat16) == ("gather" if batch == 1 else "grouped")
    idx = torch.randint(0, 512, (batch, 1), device=DEV)
    with torch.no_grad():
        eager = model(idx).logits.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(idx)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = model(idx).logits
        idx.copy_(torch.randint(0, 512, (batch, 1), device=DEV))
        graph.replay()
        fresh = model(idx).logits
    assert torch.allclose(static, fresh, atol=1e-2) and not torch.allclose(eager, fresh)


@pytest.mark.gpu
def test_training_step_never_synchronises_with_the_host():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    idx = torch.randint(0, 512, (4, 64), device=DEV)
    tgt = torch.randint(0, 512, (4, 64), device=DEV)
    for _ in range(2):  # warm-up: allocator, cuBLAS handles, optimiser state
        _train_step(model, idx, tgt)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _train_step(model, idx, tgt)
        opt.step()
        opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
