"""Metrics: JSONL per step, optional TensorBoard, FLOPs and MFU, loss-curve plots.

Training FLOPs per token (stated, PaLM/Chinchilla convention)::

    F_train = 3 * (F_acc + 2 D V + 4 L S D)

``F_acc`` is :func:`ultramem.accounting.count` ``.flops_per_token`` (forward matmuls of the
blocks, math.md §1: no attention scores, no head); ``2 D V`` is the LM head; ``4 L S D`` the
attention scores (``QK^T`` and ``AV``, 2 S D each per layer, full sequence length ``S``,
no causal halving); the factor 3 counts the backward pass as twice the forward.
MFU = tokens/s * F_train / peak FLOP/s (bf16 dense peak of the GPU; on CPU MFU is reported
only when ``train.peak_tflops`` is set).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ultramem.accounting import count
from ultramem.config import ModelConfig
from ultramem.errors import DataError

# dense bf16 tensor-core peak, TFLOP/s, by substring of the device name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
               "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "4090": 165.0, "3090": 71.0}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    fwd = count(cfg).flops_per_token + 2 * cfg.d_model * cfg.vocab_size + 4 * cfg.n_layers * seq_len * cfg.d_model
    return 3.0 * fwd


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


class MetricsLogger:
    """Appends one JSON object per line to ``RUN/metrics.jsonl``; mirrors scalars to
    TensorBoard when ``tensorboard`` is installed and asked for."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
            except ImportError:
                print("ultramem: tensorboard is not installed; logging to metrics.jsonl only")
            else:
                self.tb = SummaryWriter(str(run_dir / "tb"))

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines past the checkpoint's step (they will be recomputed)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no metrics (is {run_dir} a run directory?)")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_runs(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Train loss (smoothed) and validation loss against step for several runs in one PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(run_dirs):
        rows = read_metrics(run)
        label = labels[i] if labels else Path(run).name
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        color = f"C{i}"
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, losses, color=color, alpha=0.25, lw=0.8)
            ax.plot(steps, _smooth(list(losses)), color=color, lw=1.5, label=f"{label} train")
        if val:
            steps, losses = zip(*val)
            ax.plot(steps, losses, "o--", color=color, ms=4, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _smooth(xs: list[float]) -> list[float]:
    """Centred moving average over ~2 % of the points (no lag, unlike an EMA)."""
    w = max(1, len(xs) // 50)
    return [sum(xs[max(0, i - w): i + w + 1]) / len(xs[max(0, i - w): i + w + 1]) for i in range(len(xs))]
