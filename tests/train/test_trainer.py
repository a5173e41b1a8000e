"""Trainer: golden loss, exact resume, atomic/verified checkpoints, config-change refusal,
signals, eval/generate/plot."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_overrides

from ultramem import checkpoint as ckpt
from ultramem.errors import ConfigError, DataError
from ultramem.resolve import load_config
from ultramem.train.trainer import train

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny_loss_30.json"
ROOT = Path(__file__).resolve().parents[2]


def _losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_golden_loss(slice_data, tmp_path):
    """30 steps on CPU match the committed curve (regenerate: UPDATE_GOLDEN=1 pytest ...)."""
    cfg = load_config(overrides=tiny_overrides(slice_data))
    train(cfg, tmp_path / "run", progress=False)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 30 and losses[-1] < losses[0] - 1.0
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"what": "tests/train/train_helpers.py tiny_overrides on the slice, 30 steps, "
                                          "CPU fp32", "losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(golden, rel=2e-3, abs=2e-3)


def test_exact_resume_with_dropout(slice_data, tmp_path):
    over = tiny_overrides(slice_data, **{"train.max_steps": 8, "model.dropout": 0.1, "train.grad_accum": 2})
    train(load_config(overrides=over), tmp_path / "full", progress=False)
    s = train(load_config(overrides=over), tmp_path / "part", progress=False, stop_after=4)
    assert s["interrupted"] and s["step"] == 4
    assert [int(p.name.split("_")[1]) for p in ckpt.list_checkpoints(tmp_path / "part")] == [4]
    train(load_config(overrides=over), tmp_path / "part", progress=False)
    full, part = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert len(part) == 8
    torch.testing.assert_close(torch.tensor(part), torch.tensor(full), rtol=1e-6, atol=1e-6)


def test_changed_config_refused_unless_forced(slice_data, tmp_path):
    over = tiny_overrides(slice_data, **{"train.max_steps": 2})
    train(load_config(overrides=over), tmp_path / "r", progress=False, stop_after=1)
    changed = load_config(overrides=over + ["train.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"train.lr: 0.003 -> 0.001"):
        train(changed, tmp_path / "r", progress=False)
    assert train(changed, tmp_path / "r", progress=False, force=True)["step"] == 2


def test_vocab_mismatch_refused(slice_data, tmp_path):
    with pytest.raises(DataError, match="vocabulary mismatch"):
        train(load_config(overrides=tiny_overrides(slice_data, **{"model.vocab_size": 1000})), tmp_path / "r")


def test_checkpoint_atomic_under_failed_save(slice_data, tmp_path, monkeypatch):
    over = tiny_overrides(slice_data, **{"train.max_steps": 4, "train.ckpt_every": 2})
    real = ckpt._write_files
    calls = {"n": 0}

    def dying(tmp, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save dies halfway through writing
            real(tmp, *a, **kw)
            (tmp / "optimizer.pt").write_bytes(b"partial")
            raise KeyboardInterrupt("killed mid-save")
        return real(tmp, *a, **kw)

    monkeypatch.setattr(ckpt, "_write_files", dying)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(overrides=over), tmp_path / "r", progress=False)
    done = ckpt.list_checkpoints(tmp_path / "r")
    assert [p.name for p in done] == ["step_0000002"]
    assert list((tmp_path / "r" / "checkpoints").glob(".tmp-*"))  # the half-written one
    from ultramem.inference.load import load_run

    assert load_run(tmp_path / "r").step == 2
    monkeypatch.setattr(ckpt, "_write_files", real)
    assert train(load_config(overrides=over), tmp_path / "r", progress=False)["step"] == 4
    assert not list((tmp_path / "r" / "checkpoints").glob(".tmp-*"))


def test_corrupt_or_truncated_checkpoint_refused(slice_data, tmp_path):
    over = tiny_overrides(slice_data, **{"train.max_steps": 2})
    train(load_config(overrides=over), tmp_path / "r", progress=False)
    last = ckpt.latest_checkpoint(tmp_path / "r")
    ckpt.verify_checkpoint(last)
    weights = last / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        train(load_config(overrides=over), tmp_path / "r", progress=False)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load_checkpoint(last, torch.nn.Linear(1, 1))


def test_keep_last(slice_data, tmp_path):
    over = tiny_overrides(slice_data, **{"train.max_steps": 5, "train.ckpt_every": 1, "train.keep_last": 2})
    train(load_config(overrides=over), tmp_path / "r", progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "r")] == ["step_0000004", "step_0000005"]


def test_sigterm_saves_and_exits(slice_data, tmp_path):
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "ultramem.cli", "train", "--out", str(run), "--no-progress",
           *tiny_overrides(slice_data, **{"train.max_steps": 100000})]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    last = ckpt.latest_checkpoint(run)
    assert last is not None
    assert ckpt.verify_checkpoint(last)["step"] == len(_losses(run))


def test_eval_generate_plot(slice_data, slice_path, tmp_path):
    from ultramem.cli import main

    run = tmp_path / "r"
    train(load_config(overrides=tiny_overrides(slice_data, **{"train.max_steps": 3})), run, progress=False)
    assert (run / "loss_curve.png").stat().st_size > 0 and (run / "summary.json").is_file()
    from ultramem.eval.cli import evaluate_run

    res = evaluate_run(str(run), device="cpu")
    assert res["split"] == "val" and res["loss"] > 0 and res["bits_per_byte"] > 0
    res_txt = evaluate_run(str(run), data=str(slice_path), max_batches=2, device="cpu")
    assert res_txt["tokens"] == 2 * 8 * 32
    assert main(["generate", str(run), "--prompt", "In the beginning", "--max-new", "5"]) == 0
    assert main(["plot", str(run), str(run), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0


def test_aux_losses_memory_metrics_and_step_hook(slice_data, tmp_path, monkeypatch):
    """tiny-ultramem (shrunk): aux losses and per-memory-layer stats reach metrics.jsonl,
    and after_optimizer_step runs once per optimiser step with the step index."""
    from ultramem.model.transformer import Transformer

    calls = []
    real = Transformer.after_optimizer_step
    monkeypatch.setattr(Transformer, "after_optimizer_step", lambda self, step: (calls.append(step), real(self, step)))
    over = [f"data.path={slice_data}", "data.seq_len=32", "train.batch_size=2", "train.max_steps=3",
            "train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "train.device=cpu",
            "train.grad_accum=2"]
    train(load_config(preset="tiny-ultramem", overrides=over), tmp_path / "r", progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert calls == [0, 1, 2]
    assert all(any(k.startswith("mem/") for k in r) for r in rows)
    assert all("aux_loss" in r and any(k.startswith("aux/") for k in r) for r in rows)


def test_tensorboard_optional(slice_data, tmp_path, capsys):
    over = tiny_overrides(slice_data, **{"train.max_steps": 1, "train.tensorboard": "true"})
    train(load_config(overrides=over), tmp_path / "r", progress=False)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard is not installed" in capsys.readouterr().out
    else:
        assert (tmp_path / "r" / "tb").is_dir()


@pytest.mark.slow
def test_compile_matches_eager(slice_data, tmp_path):
    """train.compile=true (torch.compile, inductor on CPU) follows the eager loss curve."""
    over = tiny_overrides(slice_data, **{"train.max_steps": 5})
    train(load_config(overrides=over), tmp_path / "eager", progress=False)
    train(load_config(overrides=over + ["train.compile=true"]), tmp_path / "compiled", progress=False)
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "compiled")), torch.tensor(_losses(tmp_path / "eager")),
                               rtol=1e-3, atol=1e-3)
