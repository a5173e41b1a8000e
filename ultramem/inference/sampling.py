"""Token sampling for decoding: greedy, temperature, top-k, top-p, all without host syncs.

Randomness comes in as a tensor of uniform noise (``noise [B, W]``, drawn by the caller from a
seeded generator before each step), and a sample is the Gumbel-max ``argmax(logit / T + g)``
with ``g = -log(-log u)``: the same distribution as ``multinomial(softmax(logit / T))``, but a
pure function of its inputs, so a whole step (model and sampling) replays as one CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ultramem.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0: greedy. ``top_k`` 0: off. ``top_p`` 1.0: off (nucleus filter)."""

    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature}; allowed: >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k}; allowed: >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}; allowed: 0 < top_p <= 1 (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def noise_width(self, vocab: int) -> int:
        """Width ``W`` of the per-step noise: 0 (greedy), ``top_k``, or the whole vocabulary."""
        if self.greedy:
            return 0
        return min(self.top_k, vocab) if self.top_k > 0 else vocab


def sample(logits: torch.Tensor, cfg: Sampling, noise: torch.Tensor | None) -> torch.Tensor:
    """``logits [B, V]``, ``noise [B, W]`` uniform in [0, 1) -> token ids ``[B]`` (int64)."""
    if cfg.greedy:
        return logits.argmax(-1)
    scaled = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        vals, idx = torch.topk(scaled, min(cfg.top_k, scaled.shape[-1]), dim=-1)  # sorted descending
    else:
        vals, idx = torch.sort(scaled, dim=-1, descending=True)
    if cfg.top_p < 1:
        probs = vals.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep = (probs.cumsum(-1) - probs) < cfg.top_p
        vals = vals.masked_fill(~keep, float("-inf"))
    gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))
    choice = (vals + gumbel).argmax(-1, keepdim=True)
    return idx.gather(-1, choice).squeeze(-1)
