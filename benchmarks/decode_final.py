"""The decode sweep as users get it, one GPU call (docs/results/decode-h200-g.json; docs/inference.md):
every model of the three families on its default decode path (``attention="auto"``, the CUDA
graph, memory layers overlapped), batches 1 / 8 / 32 / 64 / 128 / 256, KV 2048 (halved only
where the state must fit, stated in the row), then where V2's step goes, then ``generate``
tokens/s beside Hugging Face's compiled static cache, all in one process.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/decode_final.py --out $OUT --budget-s 280 [--tag h]
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/decode_final.py --out $OUT --compile --budget-s 150
    PYTHONPATH=. python benchmarks/decode_final.py --cpu-dry-run --out /tmp/x   # tiny presets, CPU

Sections in priority order, each under a share of ``--budget-s``; the JSON is rewritten after
every row, so a run cut short keeps what it measured. Rows follow ``benchmarks/decode.py``.
Each family may run for its share from its own start (what an early one leaves, later ones
use); the last takes what is left.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import decode_parts as parts  # noqa: E402
import decode_suite as suite  # noqa: E402
from decode import fits_kv  # noqa: E402

from ultramem.ops.tuning import tuned  # noqa: E402

BATCHES = [1, 8, 64, 256, 32, 128]  # priority order
FAMILIES = [  # (family, models, share of the budget)
    ("1.6b-x12", ["dense-1.6b", "ultramem-1.6b-x12", "moe-1.6b-2in34", "pkm-1.6b-x12"], 0.32),
    ("1b-7b", ["dense-1b", "ultramem-v2-1b-7b", "olmoe-1b-7b"], 0.18),
    ("227m-1.2b", ["dense-227m", "ultramem-227m-1.2b", "ultramem-v2-227m-1.2b", "olmoe-227m-1.2b",
                   "memory-plus-227m-1.2b"], 0.2),
]
GENERATE_SHARE = 0.3
AB = ["dense-1.6b", "dense-1b", "ultramem-v2-1b-7b"]  # B=1 also with skinny_linear off (F.linear)
PARTS = ["dense-1b", "ultramem-v2-1b-7b"]  # batch 1
GENERATE = ["dense-1.6b", "ultramem-1.6b-x12"]  # batch 1, 32-token prompt, 128 new, graphs and eager
HF = [("HF generate, static cache (its auto compile)", {"cache_implementation": "static"}, 128)]
TINY = {"1.6b-x12": ["tiny-dense", "tiny-ultramem", "tiny-moe", "tiny-pkm"], "1b-7b": ["tiny-dense", "tiny-ultramem-v2"],
        "227m-1.2b": ["tiny-memory-plus"]}


def family(run: suite.Suite, fam: str, names: list[str], share: float) -> None:
    run.until = min(run.t0 + run.budget, time.time() + share * run.budget)
    print(f"== {fam} ({run.left():.0f} s)", flush=True)
    for name in names:
        if run.left() < 8:
            run.note(f"{fam}: stopped before {name} (time budget)")
            return
        model = suite.build(run, name)
        if model is None:
            continue
        memory = len(model.memory) > 0
        moe = getattr(model.blocks[0].ffn, "path_for", None) is not None
        for b in BATCHES if not run.dry else [1, 4]:
            kv = fits_kv(model, b)
            if kv == 0 or run.left() < 4:
                run.note(f"{name}: B={b} " + ("does not fit" if kv == 0 else "skipped (time budget)"))
                continue
            suite.point(run, "rows", name, fam, model, b, kv, calls=5 if moe else 10, overlap=memory,
                        attention="auto")
        if name in AB or (run.dry and name == "tiny-dense"):  # the same step with cuBLAS's GEMV at one token
            with tuned(skinny_linear_max_rows=0):
                suite.point(run, "ab", f"{name} [F.linear at one token]", fam, model, 1, fits_kv(model, 1),
                            overlap=memory, attention="auto")
        if name in PARTS or (run.dry and name == "tiny-ultramem-v2"):
            try:
                run.add("parts", {"model": name, "family": fam, **parts.step_parts(model, 1, fits_kv(model, 1))})
            except Exception as err:  # noqa: BLE001
                run.note(f"{name} parts: {type(err).__name__}: {str(err)[:300]}")
        del model
        run.sync()


def generate(run: suite.Suite) -> None:
    """HF's compiled static cache first (its compile needs a minute), then ours, same lengths."""
    # at least 80 s: hf_generate skips a compiled static cache with under 60 s left (decode-h200-j
    # lost its HF row so, at --budget-s 200)
    run.until = min(run.t0 + run.budget, time.time() + max(GENERATE_SHARE * run.budget, 80))
    small = suite.HF_DRY_SHAPE if run.dry else None
    for r in parts.hf_generate(HF, run.left, device=run.dev, small=small, arch="llama", batch=1):
        run.add("hf", r)
    for name in GENERATE if not run.dry else ["tiny-dense"]:
        model = suite.build(run, name)
        if model is not None:
            suite.generate_rows(run, name, model)
        del model
        run.sync()


def compiled(run: suite.Suite) -> None:
    """``--compile`` (a second call): HF's compiled static cache, then our generate with plain
    graphs and with ``torch.compile`` + graphs (``Engine(compile=True)``), then the one-token GEMV
    A/B at B=1 again (a repeat of the sweep's), all in one process."""
    run.until = run.t0 + run.budget
    small = suite.HF_DRY_SHAPE if run.dry else None
    for r in parts.hf_generate(HF, run.left, device=run.dev, small=small, arch="llama", batch=1):
        run.add("hf", r)
    for name in GENERATE if not run.dry else ["tiny-dense"]:
        model = suite.build(run, name)
        if model is None:
            continue
        suite.generate_rows(run, name, model, eager=False)
        if run.left() > 60 or run.dry:
            torch._dynamo.reset()
            suite.generate_rows(run, name, model, compile={"backend": "eager"} if run.dry else True)
        else:
            run.note(f"{name}: compiled generate skipped (time budget)")
        del model
        run.sync()
    for name in AB[:2] if not run.dry else ["tiny-dense"]:
        model = suite.build(run, name)
        for kernel in (True, False):
            with tuned(skinny_linear_max_rows=1 if kernel else 0):
                label = name if kernel else f"{name} [F.linear at one token]"
                suite.point(run, "ab", label, "ab", model, 1, fits_kv(model, 1), attention="auto")
        del model
        run.sync()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=280)
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny presets on the CPU, CPU timers")
    ap.add_argument("--compile", action="store_true", help="the compiled-generate call (decode-h200-<tag>-compile.json)")
    ap.add_argument("--family", action="append", default=[], choices=[f[0] for f in FAMILIES],
                    help="only these families (repeatable)")
    ap.add_argument("--tag", default="g", help="the output's letter: decode-h200-<tag>.json")
    args = ap.parse_args()
    run = suite.Suite(args.out, args.budget_s, args.cpu_dry_run)
    stem = ("decode-dry-" if run.dry else "decode-h200-") + args.tag + ("-compile" if args.compile else "")
    run.path = os.path.join(args.out, stem + ".json")
    if run.dry:
        suite.bench.time_replays = parts.cpu_timer
        parts.SCALE = 1 << 12
    else:
        parts.clocks_up(1.5)
    run.doc["ab"] = []
    run.doc["ceilings"] = parts.ceilings(run.dev)
    run.save()
    if args.compile:
        compiled(run)
        run.save()
        print("wrote", run.path, "in", round(time.time() - run.t0), "s", flush=True)
        return
    generate(run)
    families = [f for f in FAMILIES if not args.family or f[0] in args.family]
    for i, (fam, names, share) in enumerate(families):
        family(run, fam, TINY.get(fam, []) if run.dry else names, share if i < len(families) - 1 else 1.0)
    run.save()
    print("wrote", run.path, "in", round(time.time() - run.t0), "s", flush=True)


if __name__ == "__main__":
    main()
