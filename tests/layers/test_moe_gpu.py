"""MoE grouped-matmul path on the GPU equals the per-expert loop (bf16)."""

import pytest
import torch

from ultramem.layers.moe import MoEConfig
from ultramem.layers.registry import ShapeContext


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_mm_matches_loop(activation):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    torch.manual_seed(0)
    shape = ShapeContext(d_model=256, n_layers=2)
    layers = {}
    for impl in ("grouped_mm", "loop"):
        torch.manual_seed(0)
        layer = MoEConfig(n_experts=16, top_k=4, hidden=128, activation=activation, impl=impl).build(shape).cuda()
        layer.init_weights()
        layers[impl] = layer
    layers["loop"].load_state_dict(layers["grouped_mm"].state_dict())
    x = torch.randn(4, 333, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ys = {}
    for impl, layer in layers.items():
        with torch.autocast("cuda", torch.bfloat16):
            y = layer(x)
        y.float().square().mean().backward()
        ys[impl] = (y.float(), layer.w_up.grad.float().clone())
    err = (ys["grouped_mm"][0] - ys["loop"][0]).norm() / ys["loop"][0].norm()
    gerr = (ys["grouped_mm"][1] - ys["loop"][1]).norm() / ys["loop"][1].norm()
    assert err < 2e-2 and gerr < 2e-2, (err, gerr)
