"""Shared by the trainer tests."""

from pathlib import Path


def tiny_overrides(data: Path, **extra) -> list[str]:
    """A 2-block, d=64 model on the slice: fast on CPU and independent of the presets."""
    base = {
        "model.vocab_size": 8192, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2,
        "model.max_seq_len": 64, "model.ffn.hidden": 128, "data.path": str(data), "data.seq_len": 32,
        "train.batch_size": 4, "train.max_steps": 30, "train.lr": 3e-3, "train.warmup_frac": 0.1,
        "train.eval_every": 0, "train.eval_batches": 2, "train.ckpt_every": 0, "train.device": "cpu",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
