"""``tucker_per_head`` (math.md §3.7) on the retrieval kernels: the layer calls the unchanged
``tucker_topk`` kernel once per head with that head's cores; outputs and gradients equal
``impl="torch"``. Under the Triton interpreter on CPU (``-m interpreter``) and on CUDA (gpu)::

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/ops/test_tucker_per_head_kernels.py -m interpreter
    PYTHONPATH=. python3 -m pytest tests/ops/test_tucker_per_head_kernels.py -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

from ultramem.layers.registry import ShapeContext
from ultramem.layers.ultramem import UltraMemConfig

SHAPE = ShapeContext(d_model=48, n_layers=4, n_mem_layers=1)
H, H_C, R = 4, 2, 2


def _layer(impl: str, device: str):
    cfg = UltraMemConfig(knum=12, key_dim=16, heads=H, topk=6, k=5, value_dim=24, expansion=4,
                         calib_samples=64, cores=H_C, tucker_rank=R, tucker_per_head=True, impl=impl)
    cfg.validate(SHAPE, "model.memory")
    torch.manual_seed(3)
    layer = cfg.build(SHAPE).to(device)  # on the device first: init's gain calibration runs the retrieval
    layer.init_weights()
    with torch.no_grad():  # clearly different cores per head, the same in both layers
        layer.retrieval.tucker.cores.copy_(torch.randn(H, H_C, R, R, generator=torch.Generator().manual_seed(4)))
        layer.retrieval.tucker.refresh()
    return layer


def _kernel_path_matches_reference(device: str, monkeypatch) -> None:
    import ultramem.ops.retrieval.triton as kernels

    calls = []
    topk = kernels.topk
    monkeypatch.setattr(kernels, "topk", lambda *a, **kw: calls.append(tuple(a[2].shape)) or topk(*a, **kw))
    layers = {impl: _layer(impl, device) for impl in ("torch", "triton")}
    calls.clear()  # init's gain calibration ran the retrieval too
    x = torch.randn(2, 7, SHAPE.d_model, device=device)
    outs = {}
    for impl, layer in layers.items():
        y = layer(x)
        wrt = [layer.retrieval.tucker.cores, layer.retrieval.keys, layer.retrieval.query_proj.weight]
        outs[impl] = (y, *torch.autograd.grad(y.square().sum(), wrt))
    assert len(calls) == H and all(shape == (H_C, R, R) for shape in calls)  # one core set a call
    for got, want in zip(outs["triton"], outs["torch"]):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
@pytest.mark.usefixtures("interpret")
def test_per_head_kernel_path_equals_the_reference(monkeypatch):
    _kernel_path_matches_reference("cpu", monkeypatch)


@pytest.mark.gpu
def test_per_head_kernel_path_equals_the_reference_gpu(monkeypatch):
    _kernel_path_matches_reference("cuda", monkeypatch)
