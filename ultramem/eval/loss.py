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
import torch.nn.functional as F
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


@torch.no_grad()
def token_losses(model: nn.Module, batches: TokenBatches, device: torch.device, dtype: str = "auto") -> torch.Tensor:
    """Loss (nats, fp32, on the CPU) of every predicted token of the whole split, ``[W, S]`` for
    its ``W`` windows of ``S`` tokens in stream order (unshuffled ``batches``; the last, partial
    batch included). Row ``w`` predicts stream tokens ``w S + 1 .. w S + S``; column ``p`` is the
    position in the window (context length ``p``), so ``mean(0)`` is the per-position curve."""
    if batches.shuffle:
        raise ValueError("token_losses needs unshuffled batches (stream order)")
    was_training = model.training
    model.eval()
    out = []
    n_win, bsz = len(batches), batches.batch_size
    for k in range((n_win + bsz - 1) // bsz):
        x, y = batches.batch(k)
        keep = min(bsz, n_win - k * bsz)  # the last batch would wrap around to the start
        x, y = x[:keep].to(device), y[:keep].to(device)
        with autocast_ctx(device, dtype):
            logits = model(x).logits
        out.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y).cpu())
    model.train(was_training)
    return torch.cat(out)
