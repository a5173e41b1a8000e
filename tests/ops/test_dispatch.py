"""The dispatch rule every op follows (``ultramem.ops._dispatch``), and the kernels' lazy import.

``impl="torch"`` is the reference; ``"auto"`` falls back to it where the kernels cannot run;
``"triton"`` there raises ConfigError with the reason; an unknown impl is a ConfigError.

    .venv/bin/python -m pytest tests/ops/test_dispatch.py
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import ultramem.ops._dispatch as dispatch
from ultramem.errors import ConfigError
from ultramem.ops import lookup_reduce as lr
from ultramem.ops import retrieval as rt
from ultramem.ops import skinny_linear as sl
from ultramem.ops.lookup_reduce import reference as lr_ref
from ultramem.ops.retrieval import reference as rt_ref


def _calls():
    """One call of each op with kernels on CPU tensors: ``name -> (fn(impl), reference())``."""
    g = torch.Generator().manual_seed(0)
    v, s = torch.randn(7, 8, generator=g), torch.randn(3, 4, 2, generator=g)
    idx, blk = torch.randint(0, 7, (3, 4), generator=g), torch.randint(0, 2, (3, 4), generator=g)
    s_row, s_col = torch.randn(2, 20, 2, generator=g), torch.randn(2, 20, 2, generator=g)
    cores = torch.randn(2, 2, 2, generator=g)
    u, _, vh = torch.linalg.svd(cores.sum(0))
    u, vv = u[:, 0].contiguous(), vh[0].contiguous()
    perm = torch.randperm(400, generator=g).to(torch.int32)
    addr = torch.randint(0, 400, (3, 5), generator=g)
    off = torch.tensor(-20)
    x, w = torch.randn(1, 16, generator=g), torch.randn(5, 16, generator=g)
    return {
        "lookup_reduce": (lambda impl: lr.lookup_reduce(v, idx, s, blk, 2, impl=impl),
                          lambda: lr_ref.lookup_reduce(v, idx, s, blk, 2)),
        "tucker_topk": (lambda impl: rt.tucker_topk(s_row, s_col, cores, u, vv, 5, 6, impl=impl),
                        lambda: rt_ref.tucker_topk(s_row, s_col, cores, u, vv, 5, 6)),
        "product_key_topk": (lambda impl: rt.product_key_topk(s_row[..., 0], s_col[..., 0], 5, 6,
                                                              impl=impl),
                             lambda: rt_ref.product_key_topk(s_row[..., 0], s_col[..., 0], 5, 6)),
        "ive_address": (lambda impl: rt.ive_address(addr, perm, 100, impl=impl),
                        lambda: rt_ref.ive_address(addr, perm, 100)),
        "ring_address": (lambda impl: rt.ring_address(addr, perm, 70, off, 150, impl=impl),
                         lambda: rt_ref.ring_address(addr, perm, 70, off, 150)),
        "skinny_linear": (lambda impl: sl.skinny_linear(x, w, impl=impl), lambda: x @ w.T),
    }


def _equal(a, b) -> None:
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("op", sorted(_calls()))
def test_cpu_without_interpreter(op, monkeypatch):
    """CPU tensors, no interpreter: auto and torch run the reference, triton names the device."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fn, ref = _calls()[op]
    with torch.no_grad():
        _equal(fn("auto"), ref())
        _equal(fn("torch"), ref())
        with pytest.raises(ConfigError, match=rf"{op}: impl='triton' but a tensor is on cpu"):
            fn("triton")
        with pytest.raises(ConfigError, match=rf"{op}: impl 'cuda' is not one of"):
            fn("cuda")


@pytest.mark.parametrize("op", sorted(_calls()))
def test_kernels_that_do_not_import(op, monkeypatch):
    """Where the tensors suit the kernels but Triton does not import: auto falls back, triton
    says why (the import error)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors would suit the interpreter
    for name in (lr.FORWARD, lr.BACKWARD, rt.KERNELS, sl.KERNELS):
        monkeypatch.setitem(dispatch._LOADED, name, None)
        monkeypatch.setitem(dispatch._FAILED, name, "ModuleNotFoundError: No module named 'triton'")
    fn, ref = _calls()[op]
    with torch.no_grad():
        _equal(fn("auto"), ref())
        with pytest.raises(ConfigError, match="did not import .ModuleNotFoundError"):
            fn("triton")
    assert not (lr.triton_available(torch.zeros(1)) or rt.triton_available(torch.zeros(1))
                or sl.triton_available(torch.zeros(1)))


def test_import_and_model_do_not_import_triton():
    """``import ultramem`` and every layer module leave Triton unimported, and a tiny memory
    model's forward and backward on CPU import no kernel module: kernels load on the first call
    that may use them. (Building a model may still import Triton through PyTorch itself:
    ``nn.Embedding``'s init on the meta device imports ``torch._dynamo``, which probes for it.)"""
    code = textwrap.dedent("""
        import sys
        import torch
        import ultramem
        import ultramem.layers, ultramem.ops, ultramem.ops.tuning
        from ultramem import load_config
        from ultramem.model.transformer import Transformer
        print(sum(m == "triton" or m.startswith("triton.") for m in sys.modules))
        for name in ("tiny-ultramem", "tiny-ultramem-v2", "tiny-pkm"):
            cfg = load_config(name, overrides=["model.vocab_size=64"])
            model = Transformer.build(cfg.model)
            model(torch.randint(0, 64, (2, 8))).logits.sum().backward()
        print(sum(m.startswith("ultramem.ops.") and m.rsplit(".", 1)[-1].startswith("triton")
                  for m in sys.modules))
    """)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["0", "0"], proc.stdout
