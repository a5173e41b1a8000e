"""``ultramem generate``: sample text from a trained run with the KV cache.

    ultramem generate runs/tiny-ultramem --prompt "Fellow-Citizens of the Senate" --max-new 100

The model's ``state`` dict holds the KV cache and every layer's decode state: the prompt is
run once (prefill), then each new token is fed alone with the same dict.
"""

from __future__ import annotations

import argparse

import torch

from ultramem.errors import ConfigError, DataError
from ultramem.inference.load import load_run
from ultramem.model.transformer import Transformer


@torch.no_grad()
def generate(model: Transformer, ids: list[int], max_new: int, temperature: float = 0.8, top_k: int = 50,
             seed: int = 0, eot_id: int | None = None) -> list[int]:
    """Sample up to ``max_new`` tokens after ``ids`` (stops at ``eot_id``); returns the new ids."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    max_len = model.cfg.max_seq_len
    ids = ids[-(max_len - max_new):] if max_new < max_len else ids[-1:]
    state: dict = {}
    logits = model(torch.tensor([ids], device=device), state=state).logits[0, -1]
    out: list[int] = []
    for _ in range(min(max_new, max_len - len(ids))):
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits.float() / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if eot_id is not None and nxt == eot_id:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]], device=device), state=state).logits[0, -1]
    return out


def check_generate_args(max_new: int, temperature: float, top_k: int, max_seq_len: int) -> None:
    """Range checks of the sampling arguments (ConfigError naming the argument)."""
    if max_new < 0:
        raise ConfigError(f"--max-new={max_new}: must be >= 0")
    if max_new >= max_seq_len:
        raise ConfigError(f"--max-new={max_new}: must be < the model's context model.max_seq_len={max_seq_len} "
                          f"(the prompt needs at least one position)")
    if not temperature >= 0:
        raise ConfigError(f"--temperature={temperature}: must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ConfigError(f"--top-k={top_k}: must be >= 0 (0 = no top-k cut)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new", type=int, default=100, help="new tokens")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    loaded = load_run(args.run, args.device)
    check_generate_args(args.max_new, args.temperature, args.top_k, loaded.cfg.model.max_seq_len)
    tok = loaded.tokenizer
    if tok is None:
        raise DataError(f"{args.run}: no tokenizer.json (the run was trained on pre-tokenized data)")
    ids = tok.encode(args.prompt) if args.prompt else [tok.eot_id]
    new = generate(loaded.model, ids, args.max_new, args.temperature, args.top_k, args.seed, tok.eot_id)
    print(args.prompt + tok.decode(new))
    return 0
