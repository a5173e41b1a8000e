"""``ultramem generate`` and :func:`generate`: batched sampling from a model with the decode engine.

    ultramem generate runs/tiny-ultramem --prompt "Fellow-Citizens of the Senate" --max-new 100
    ultramem generate runs/tiny-ultramem --prompts prompts.txt --temperature 0 --device cuda

Several prompts (``--prompts FILE``, one per line) decode as one ragged batch; the command
prints each continuation, then the tokens/s (stderr). See docs/inference.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ultramem.data.tokenizer import Tokenizer
from ultramem.errors import ConfigError, DataError
from ultramem.inference.engine import Engine, Generated
from ultramem.inference.load import load_run
from ultramem.inference.sampling import Sampling
from ultramem.model.transformer import Transformer


@dataclass
class Generation:
    """``ids``: new token ids per prompt; ``texts``: their decoding (when a tokenizer was given)."""

    ids: list[list[int]]
    texts: list[str] | None
    result: Generated

    @property
    def tokens_per_s(self) -> float:
        return self.result.tokens_per_s


@torch.no_grad()
def generate(model: Transformer, prompts: list[str] | list[list[int]], max_new: int = 64, *,
             tokenizer: Tokenizer | None = None, temperature: float = 0.8, top_k: int = 50,
             top_p: float = 1.0, seed: int = 0, stop: list[int] | list[list[int]] | None = None,
             graphs: bool | None = None, overlap: bool = False, compile: bool | dict = False,
             engine: Engine | None = None) -> Generation:
    """Continue each prompt by up to ``max_new`` tokens, all prompts in one batch.

    ``prompts``: strings (needs ``tokenizer``) or token-id lists. ``stop``: ids that end a
    sequence (one list for all, or one list per prompt; default the tokenizer's end-of-text).
    ``temperature`` 0 is greedy. ``graphs`` (default: on CUDA) replays the decode step as a CUDA
    graph; ``overlap`` runs memory layers on a side stream; ``compile`` puts the decode step
    through ``torch.compile`` before capturing it (see :class:`Engine`). Seeded: same seed,
    same tokens.
    Pass an :class:`Engine` to reuse its state and captured graphs across calls.
    """
    ids = _encode(prompts, tokenizer)
    stops = _stops(stop, len(ids), tokenizer)
    sampling = Sampling(temperature, top_k, top_p)
    if engine is None:
        longest = max(len(p) for p in ids)
        if longest + max_new > model.cfg.max_seq_len:
            raise ConfigError(f"prompt of {longest} tokens + max_new={max_new} exceed the model's context "
                              f"model.max_seq_len={model.cfg.max_seq_len}; shorten the prompt or lower --max-new")
        engine = Engine(model, len(ids), longest + max_new, sampling, graphs, overlap, compile=compile)
    elif engine.sampling != sampling:
        raise ConfigError(f"engine built for {engine.sampling}, called with {sampling}; build one per setting")
    res = engine.generate_ids(ids, max_new, stops, seed)
    texts = [tokenizer.decode(x) for x in res.ids] if tokenizer is not None else None
    return Generation(res.ids, texts, res)


def _encode(prompts: list[str] | list[list[int]], tok: Tokenizer | None) -> list[list[int]]:
    if not prompts:
        raise ConfigError("generate: no prompts")
    if all(isinstance(p, str) for p in prompts):
        if tok is None:
            raise ConfigError("generate: text prompts need a tokenizer (or pass token-id lists)")
        return [tok.encode(p) if p else [tok.eot_id] for p in prompts]
    return [list(p) for p in prompts]


def _stops(stop: list[int] | list[list[int]] | None, n: int, tok: Tokenizer | None) -> list[list[int]]:
    if stop is None:
        return [[tok.eot_id] if tok is not None else [] for _ in range(n)]
    if all(isinstance(s, int) for s in stop):
        return [list(stop) for _ in range(n)]
    if len(stop) != n:
        raise ConfigError(f"stop: {len(stop)} lists for {n} prompts; give one list for all or one per prompt")
    return [list(s) for s in stop]


def check_generate_args(max_new: int, temperature: float, top_k: int, max_seq_len: int,
                        top_p: float = 1.0) -> None:
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
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p={top_p}: must be in (0, 1] (1 = no nucleus cut)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--prompts", default=None, help="file of prompts, one per line (decoded as one batch)")
    p.add_argument("--max-new", type=int, default=100, help="new tokens")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-graphs", action="store_true", help="decode eagerly on CUDA (no CUDA graph)")
    p.add_argument("--overlap", action="store_true", help="memory layers on a side stream (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (then graphed)")
    p.set_defaults(func=run)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts is None:
        return [args.prompt]
    path = Path(args.prompts)
    if not path.is_file():
        raise DataError(f"--prompts={path}: no such file (one prompt per line)")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"--prompts={path}: no non-empty line (one prompt per line)")
    return lines


def run(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args)
    loaded = load_run(args.run, args.device)
    check_generate_args(args.max_new, args.temperature, args.top_k, loaded.cfg.model.max_seq_len, args.top_p)
    tok = loaded.tokenizer
    if tok is None:
        raise DataError(f"{args.run}: no tokenizer.json (the run was trained on pre-tokenized data)")
    if args.max_new == 0:
        print("\n".join(prompts))
        return 0
    out = generate(loaded.model, prompts, args.max_new, tokenizer=tok, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   graphs=False if args.no_graphs else None, overlap=args.overlap, compile=args.compile)
    for prompt, text in zip(prompts, out.texts or []):
        print(prompt + text)
    r = out.result
    print(f"{r.new_tokens} new tokens for {len(prompts)} prompt(s) in {r.prefill_s + r.decode_s:.2f} s: "
          f"{r.tokens_per_s:.1f} tokens/s (prefill {r.prefill_s * 1e3:.0f} ms, "
          f"{'CUDA graph' if r.graphed else 'eager'} decode)", file=sys.stderr)
    return 0
