"""Analytic decode bytes (``ultramem bench decode``) and the benchmark's figures."""

import json
import sys
from pathlib import Path

import pytest
import torch

from ultramem.cli import main
from ultramem.inference.bench import distinct, step_bytes
from ultramem.model.transformer import Transformer
from ultramem.presets import get_preset


def meta(name: str) -> Transformer:
    with torch.device("meta"):
        return Transformer(get_preset(name).model)


def test_dense_bytes_are_weights_plus_kv():
    m = meta("tiny-dense")
    cfg = m.cfg
    weights = sum(p.numel() for p in m.parameters()) * 2  # tied: embedding = LM head, read once
    kv = cfg.n_layers * 2 * 3 * 100 * cfg.kv_heads * cfg.head_dim * 2
    assert step_bytes(m, 3, 100) == weights + kv + 3 * cfg.d_model * 2


def test_gathered_tables_count_distinct_rows():
    assert distinct(100, 1) == pytest.approx(1.0)
    assert distinct(100, 10_000) == pytest.approx(100.0)
    moe, dense = meta("tiny-moe"), meta("tiny-dense")
    # one token touches top_k of the experts; a large batch touches them all
    small, large = step_bytes(moe, 1, 1), step_bytes(moe, 4096, 1)
    experts = sum(p.numel() for layer in moe.sparse_layers() for p in (layer.w_up, layer.w_down)) * 2
    kv_delta = moe.cfg.n_layers * 2 * 4095 * moe.cfg.kv_heads * moe.cfg.head_dim * 2 + 4095 * moe.cfg.d_model * 2
    assert large - small - kv_delta == pytest.approx(experts * (1 - distinct(8, 2) / 8), rel=1e-3)
    mem = meta("tiny-ultramem")
    values = sum(layer.values.numel() for layer in mem.memory) * 2
    everything = sum(p.numel() for p in mem.parameters()) * 2
    assert step_bytes(mem, 1, 1) < everything - 0.9 * values  # one token reads few value rows
    assert step_bytes(dense, 1, 1) < step_bytes(mem, 1, 1)


def test_bench_cli_without_gpu_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert main(["bench", "decode", "--preset", "tiny-dense"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_plot_writes_figures(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from decode_plot import plot

    rows = [{"model": m, "family": "f", "batch": b, "kv": 2048, "ms": 1.0 + b / 100, "tokens_per_s": 1.0,
             "bytes": 1e9 * b, "GBps": 1000.0, "overlap": o} for m, o in (("dense", False), ("um", True))
            for b in (1, 8, 64)]
    fig6 = [{"model": "um", "family": "fig6c", "batch": 1, "kv": 2048, "ms": 1 + f / 100, "value_params": f * 1e9,
             "value_rows_factor": f} for f in (1, 2, 4, 8)]
    path = tmp_path / "decode-x.json"
    path.write_text(json.dumps({"device": "x", "command": "c", "copy_GBps": 4000, "rows": rows, "fig6c": fig6}))
    outs = plot(str(path))
    assert [p.name for p in outs] == ["decode-x.png", "decode-x-fig6c.png"]
    assert all(p.stat().st_size > 10_000 for p in outs)
