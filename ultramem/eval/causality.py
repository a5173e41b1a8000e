"""Causality check of a language model as it trains: perturb the tokens at positions ``>= cut``;
nothing the model computes for positions ``< cut`` may change.

Checked in training mode (dropout masks replayed from one seed, BatchNorm on batch
statistics aside), with the autocast and the kernels training uses, forward **and** backward:

- the logits at positions ``< cut``;
- the gradient of the LM loss of the tokens ``< cut`` (predicted at positions ``< cut - 1``)
  with respect to the token embeddings at positions ``< cut`` and to every parameter.

Floating-point atomics (the value tables' scatter-add backward, some matmul splits) make two
identical passes differ slightly, so each quantity is compared with a second unperturbed pass
(the noise floor). Rounding also depends on the batch's other tokens where they change the
shape of a computation (an MoE expert's token count picks another GEMM), so a leak is a
perturbed difference above ``NOISE_FACTOR`` x the noise floor plus ``rel`` x the quantity's
scale (``rel``: 1e-5 in fp32; with bf16 autocast ~1e-2, bf16's rounding). A real leak moves
outputs by a fraction of their size. The loss excludes the layers' aux losses: a
load-balancing loss is a batch statistic by design.

    report = check_causality(model, idx, cut=512)   # idx [B, S] token ids
    report["leak"]  # True when any quantity changed beyond its noise floor
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NOISE_FACTOR = 10.0  # a leak: perturbed difference > NOISE_FACTOR x repeat difference + rel x scale


def _pass(model: nn.Module, idx: torch.Tensor, cut: int, seed: int, autocast: Any) -> dict[str, torch.Tensor]:
    """One training-mode forward + backward of the loss over positions ``< cut``."""
    model.zero_grad(set_to_none=True)
    captured: dict[str, torch.Tensor] = {}

    def keep(_mod: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.detach().requires_grad_(True)  # a leaf: its .grad is d loss / d embeddings
        captured["embed"] = out
        return out

    handle = model.embed_tokens.register_forward_hook(keep)
    torch.manual_seed(seed)  # the same dropout masks in every pass
    try:
        with autocast:
            logits = model(idx).logits
        targets = idx[:, 1:cut]  # positions < cut - 1 predict tokens < cut: none perturbed
        loss = F.cross_entropy(logits[:, :cut - 1].float().flatten(0, 1), targets.flatten())
        loss.backward()
    finally:
        handle.remove()
    grads = [p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None]
    emb = captured["embed"].grad
    return {"logits": logits[:, :cut].detach().float(), "logits_after": logits[:, cut:].detach().float(),
            "embed_grad": emb[:, :cut].detach().float(), "param_grad": torch.cat(grads)}


def check_causality(model: nn.Module, idx: torch.Tensor, cut: int, seed: int = 0,
                    autocast: Any = None, rel: float = 1e-5) -> dict[str, Any]:
    """Compare two unperturbed passes and one with ``idx[:, cut:]`` replaced (see module
    docstring). ``autocast``: a context manager (default: none); ``rel``: the rounding allowed,
    relative to each quantity's largest value. Returns per quantity the max
    abs difference perturbed-vs-base and repeat-vs-base, and ``leak``. The model is left in
    training mode with its gradients cleared."""
    if not 0 < cut < idx.shape[1] - 1:
        raise ValueError(f"cut={cut} must be inside the sequence (1 .. {idx.shape[1] - 2})")
    autocast = autocast or contextlib.nullcontext()
    model.train()
    vocab = model.embed_tokens.num_embeddings
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    pert = idx.clone()
    new = torch.randint(0, vocab, pert[:, cut:].shape, generator=gen).to(idx.device)
    pert[:, cut:] = torch.where(new == pert[:, cut:], (new + 1) % vocab, new)  # every later token changes
    base = _pass(model, idx, cut, seed, autocast)
    again = _pass(model, idx, cut, seed, autocast)
    other = _pass(model, pert, cut, seed, autocast)
    model.zero_grad(set_to_none=True)
    out: dict[str, Any] = {"cut": cut, "tokens": list(idx.shape)}
    leak = False
    for key in ("logits", "embed_grad", "param_grad"):
        noise = float((again[key] - base[key]).abs().max())
        diff = float((other[key] - base[key]).abs().max())
        scale = float(base[key].abs().max())
        bad = diff > NOISE_FACTOR * noise + rel * scale
        out[key] = {"perturbed": diff, "repeat": noise, "scale": scale, "rel": diff / max(scale, 1e-30), "leak": bad}
        leak |= bad
    out["later_logits_change"] = float((other["logits_after"] - base["logits_after"]).abs().max())
    out["leak"] = leak
    return out
