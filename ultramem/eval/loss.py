"""Validation loss and bits per byte.

bits/byte = (sum of token losses in nats) / ln 2 / (UTF-8 bytes those tokens encode). The
byte count of a split comes from the prepared index (the text's UTF-8 bytes, EOT tokens
encode none); when only part of a split is evaluated, the bytes are scaled by the
fraction of tokens evaluated (bytes/token of the split).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ultramem.data.loader import TokenBatches


def autocast_ctx(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU (``auto``) or when asked; fp32 (no autocast) otherwise."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: TokenBatches, device: torch.device, dtype: str = "auto",
                  max_batches: int | None = None) -> tuple[float, int]:
    """Mean token loss (nats) over the first ``max_batches`` batches (all when None) and the
    number of tokens it covers. Sequential, non-overlapping windows: deterministic."""
    was_training = model.training
    model.eval()
    total, n_tok = 0.0, 0
    n = max(1, len(batches) // batches.batch_size)  # whole batches (no wrap-around)
    if max_batches is not None:
        n = min(n, max_batches)
    for k in range(n):
        x, y = batches.batch(k)
        x, y = x.to(device), y.to(device)
        with autocast_ctx(device, dtype):
            out = model(x, y)
        total += float(out.loss) * y.numel()
        n_tok += y.numel()
    model.train(was_training)
    return total / max(1, n_tok), n_tok


def bits_per_byte(loss_nats: float, tokens: int, split_tokens: int, split_bytes: int | None) -> float | None:
    if not split_bytes or not split_tokens:
        return None
    return loss_nats * tokens / math.log(2) / (split_bytes * tokens / split_tokens)
