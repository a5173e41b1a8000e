"""PKM layer (math.md §2): phase-1 product-key top-k and the layer against its definition."""

import torch

from ultramem.layers.pkm import PKMConfig
from ultramem.layers.registry import ShapeContext
from ultramem.ops.retrieval.reference import brute_force_topk, product_key_topk


def test_phase1_is_lossless_when_k_ge_m():
    for n, k, m in [(16, 8, 8), (33, 12, 7), (50, 20, 20)]:
        s_row, s_col = torch.randn(5, 3, n), torch.randn(5, 3, n)
        scores, addr = product_key_topk(s_row, s_col, k, m)
        full = s_row.unsqueeze(-1) + s_col.unsqueeze(-2)  # [..., N, N]
        ref_scores, ref_addr = brute_force_topk(full, m)
        assert torch.equal(addr.sort(-1).values, ref_addr.sort(-1).values)
        assert torch.allclose(scores, ref_scores)
        a, b = addr // n, addr % n
        assert torch.allclose(scores, s_row.gather(-1, a) + s_col.gather(-1, b))


def test_pkm_matches_definition():
    cfg = PKMConfig(placement="1:1", n_keys=12, key_dim=8, heads=3, topk=5, query_norm="layernorm")
    layer = cfg.build(ShapeContext(d_model=16, n_layers=2))
    layer.init_weights()
    x = torch.randn(2, 4, 16)
    y = layer(x)
    flat = x.reshape(-1, 16)
    q = layer.retrieval.query_norm(layer.retrieval.query_proj(flat).view(8, 3, 2, 8))
    out = torch.zeros(8, 16)
    for t in range(8):
        for h in range(3):
            keys = layer.retrieval.keys[:, h, :, 0]  # [row/col, N, K]
            full = (keys[0] @ q[t, h, 0])[:, None] + (keys[1] @ q[t, h, 1])[None, :]
            s, a = full.flatten().topk(5)
            out[t] += (s.softmax(-1)[:, None] * layer.values[a]).sum(0)
    assert torch.allclose(y.reshape(-1, 16), out, atol=1e-5)
