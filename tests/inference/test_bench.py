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


def _parts():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import decode_parts

    return decode_parts


def test_part_bytes_weights_once_and_gathered_rows():
    parts = _parts()
    dense = meta("tiny-dense")
    ffn = [b.ffn for b in dense.blocks]
    assert parts.part_bytes(ffn, 7) == sum(p.numel() for m in ffn for p in m.parameters()) * 2
    mem = meta("tiny-ultramem")
    values = sum(layer.values.numel() for layer in mem.memory) * 2
    full = sum(p.numel() for layer in mem.memory for p in layer.parameters()) * 2
    one, many = parts.part_bytes(list(mem.memory), 1), parts.part_bytes(list(mem.memory), 10_000)
    assert one < full - 0.9 * values and many == pytest.approx(full, rel=1e-3)  # few rows, then all


def test_step_parts_times_every_part(monkeypatch):
    """The per-part breakdown on the CPU (the host-clock stand-in for the graph timer): every
    part of a memory model is timed, bytes are the part's, glue is the step minus the parts."""
    parts = _parts()
    from ultramem.inference import bench

    monkeypatch.setattr(bench, "time_replays", parts.cpu_timer)
    model = Transformer.build(get_preset("tiny-ultramem").model).eval()
    out = parts.step_parts(model, 2, 16)
    assert set(out["parts"]) == {"attention", "ffn", "memory", "memory.scores", "memory.retrieval", "head", "embed"}
    assert all(v["ms"] > 0 for v in out["parts"].values())
    top = sum(out["parts"][k]["ms"] for k in ("attention", "ffn", "memory", "head", "embed"))
    assert out["glue_ms"] == pytest.approx(out["step_ms"] - top, abs=1e-3)
    kv = model.cfg.n_layers * 2 * 2 * 16 * model.cfg.kv_heads * model.cfg.head_dim * 2
    assert out["parts"]["attention"]["bytes"] > kv


def test_moe_decode_threshold_is_32_assignments():
    """``gather_max`` 32 (decode-h200-c.json: gather wins at 32 assignments, loses at 64)."""
    from ultramem.layers.moe import MoEConfig
    from ultramem.layers.registry import ShapeContext

    cfg = MoEConfig(n_experts=8, top_k=2, hidden=16)
    assert cfg.gather_max == 32
    layer = cfg.build(ShapeContext(d_model=32, n_layers=2))
    cpu = torch.device("cpu")
    assert layer.path_for(16, cpu, torch.float32) == "gather"
    assert layer.path_for(17, cpu, torch.float32) != "gather"


def test_plot_draws_the_parts_figure(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from decode_plot import plot

    rows = [{"model": "m", "family": "f", "batch": b, "kv": 2048, "ms": 2.0 + b, "tokens_per_s": 1.0, "bytes": 1e9,
             "GBps": 1.0, "overlap": False} for b in (1, 8)]
    part = {"ms": 0.5, "bytes": 1, "GBps": 1.0}
    parts = [{"model": "m", "family": "f", "batch": b, "kv": 2048, "step_ms": 2.0 + b, "glue_ms": 0.1,
              "parts": {"attention": part, "ffn": part, "memory": part, "head": part}} for b in (1, 8)]
    path = tmp_path / "decode-y.json"
    path.write_text(json.dumps({"device": "x", "command": "c", "ceilings": {"copy_GBps": 2700, "read_GBps": 4200},
                                "rows": rows, "parts": parts}))
    outs = plot(str(path))
    assert [p.name for p in outs] == ["decode-y.png", "decode-y-parts.png"]
    assert outs[1].stat().st_size > 10_000
