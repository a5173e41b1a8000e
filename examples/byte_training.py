"""The training loop both examples share: random byte windows of the bundled text slice, AdamW
over :func:`ultramem.nn.param_groups`, and the memory layers' hooks around each step. Any host
model's loop needs the same four calls (marked below)."""

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ultramem.nn import after_optimizer_step, aux_loss, param_groups, set_lr

SLICE = Path(__file__).resolve().parents[1] / "ultramem/assets/corpus_slice.txt"


def train(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
          steps: int, seq: int = 64, batch: int = 8, lr: float = 3e-3) -> list[float]:
    """``steps`` AdamW steps; ``loss_fn(x, y)`` with ``x, y [batch, seq]`` bytes, ``y`` = ``x``
    shifted by one. Returns the losses."""
    data = torch.tensor(list(SLICE.read_bytes()[:20000]), dtype=torch.long)
    opt = torch.optim.AdamW(param_groups(model, base_lr=lr), betas=(0.9, 0.95))  # 1: value-table groups
    losses = []
    for step in range(steps):
        i = torch.randint(0, len(data) - seq - 1, (batch,))
        window = torch.stack([data[j : j + seq + 1] for j in i])  # [batch, seq + 1]
        loss = loss_fn(window[:, :-1], window[:, 1:])
        (loss + aux_loss(model)).backward()  # 2: the layers' aux losses (Tucker singular values)
        set_lr(opt, step, steps)  # 3: each group's LR (constant value LR, value-LR multiplier)
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_optimizer_step(model, step)  # 4: once per step (refresh the Tucker rank-1 u, v)
        losses.append(loss.item())
    return losses
