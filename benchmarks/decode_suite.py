"""The second decode sweep, one GPU call (docs/results/decode-h200-c.json; docs/inference.md):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/decode_suite.py --out $OUT --budget-s 320
    PYTHONPATH=. python benchmarks/decode_suite.py --cpu-dry-run --out /tmp/x   # tiny presets, CPU

Sections in priority order, each under a share of ``--budget-s``, the JSON rewritten after
every row (a run cut short keeps what it measured):

1. ceilings: copy (read + write), read-only (``sum``), a 1-row GEMV through 1 GiB;
2. 1.6B-x12 family: dense-1.6b / ultramem-1.6b-x12 (overlap off and on) / moe-1.6b-2in34, the
   MoE also with each decode path forced (gather, grouped) near the threshold; per-part
   breakdown (``decode_parts.step_parts``); ``generate`` tokens/s at batch 1; our UltraMem
   layer alone;
3. 1B/7B family: dense-1b / ultramem-v2-1b-7b (overlap off and on) / olmoe-1b-7b, breakdown;
4. 227M/1.2B family (dense / ultramem / ultramem-v2 / olmoe / memory-plus) and the
   ``torch.compile`` path (``Engine(compile=True)``, then graphed) beside our graphs for
   dense-227m and ultramem-227m-1.2b;
5. UltraMem Fig. 6(c): ultramem-227m-1.2b with 1x/2x/4x/8x value rows at the same top-m;
6. lucidrains' ``ultra-mem`` layer at our 1.6B layer's size; Hugging Face ``generate()`` on a
   Llama of dense-1.6b's shape (default cache, static cache eager, static cache compiled).

Rows follow ``benchmarks/decode.py`` (``model, family, batch, kv, ms, tokens_per_s, bytes,
GBps``); forced MoE paths are separate models (``moe-1.6b-2in34 [gather]``) of family
``1.6b-x12 moe paths``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import decode_parts as parts  # noqa: E402
from decode import fits_kv  # noqa: E402 -- one memory rule for both sweeps

from ultramem.inference import bench  # noqa: E402
from ultramem.inference.engine import Engine  # noqa: E402
from ultramem.inference.sampling import Sampling  # noqa: E402
from ultramem.presets import get_preset  # noqa: E402

# HF generate() rows: (label, generate kwargs, new tokens); the dry run's tiny Llama shape
HF_SETTINGS = [("HF generate, default (dynamic) cache", {}, 32),
               ("HF generate, static cache, compile disabled", {"cache_implementation": "static",
                                                                  "disable_compile": True}, 32),
               ("HF generate, static cache (its auto compile)", {"cache_implementation": "static"}, 128)]
HF_DRY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4, "vocab_size": 512}
FULL = {
    "1.6b-x12": ["moe-1.6b-2in34", "dense-1.6b", "ultramem-1.6b-x12"],  # the MoE first: priority 1
    "1b-7b": ["dense-1b", "ultramem-v2-1b-7b", "olmoe-1b-7b"],
    "227m-1.2b": ["dense-227m", "ultramem-227m-1.2b", "ultramem-v2-227m-1.2b", "olmoe-227m-1.2b",
                  "memory-plus-227m-1.2b"],
}
TINY = {"1.6b-x12": ["tiny-moe", "tiny-dense", "tiny-ultramem"], "1b-7b": ["tiny-dense", "tiny-ultramem-v2", "tiny-moe"],
        "227m-1.2b": ["tiny-dense", "tiny-ultramem", "tiny-ultramem-v2", "tiny-moe", "tiny-memory-plus"]}
BATCHES = [1, 8, 64, 256, 32]  # priority order
MOE_EXTRA = [16, 128]  # near the gather / grouped threshold, and between 64 and 256
MOE_FORCED = {"gather": [16, 32], "grouped_mm": [1, 8]}  # each path where "auto" takes the other
PART_BATCHES = [1, 8, 64]
SHARES = {"ceilings": 0.03, "1.6b-x12": 0.36, "1b-7b": 0.2, "227m-1.2b": 0.22, "fig6c": 0.07, "others": 0.12}


class Suite:
    def __init__(self, out: str, budget_s: float, dry: bool) -> None:
        self.dry, self.dev = dry, "cpu" if dry else "cuda"
        os.makedirs(out, exist_ok=True)
        name = "cpu (dry run)" if dry else torch.cuda.get_device_name()
        self.path = os.path.join(out, "decode-dry.json" if dry else "decode-h200-c.json")
        self.t0, self.budget, self.until = time.time(), budget_s, time.time() + budget_s
        self.doc: dict = {"device": name, "command": " ".join(["python3"] + sys.argv), "torch": torch.__version__,
                          "ceilings": {}, "rows": [], "parts": [], "generate": [], "compile": [], "fig6c": [],
                          "layers": [], "hf": [], "notes": []}

    def left(self) -> float:
        return min(self.until, self.t0 + self.budget) - time.time()

    def section(self, key: str) -> None:
        """Open a section: it may run until its share of the budget is used (or the budget)."""
        self.until = min(self.t0 + self.budget, time.time() + SHARES[key] * self.budget + 5)
        print(f"== {key} ({self.left():.0f} s)", flush=True)

    def note(self, msg: str) -> None:
        self.doc["notes"].append(msg)
        print("note:", msg, flush=True)

    def add(self, key: str, row: dict) -> None:
        self.doc[key].append(row)
        print(key, json.dumps(row), flush=True)
        self.save()

    def save(self) -> None:
        self.doc["seconds"] = round(time.time() - self.t0, 1)
        with open(self.path, "w") as f:
            json.dump(self.doc, f, indent=1)

    def sync(self) -> None:
        if not self.dry:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def build(run: Suite, name: str, cfg=None):
    try:
        cfg = cfg or get_preset(name).model
        cfg.dropout = 0.0
        return bench.build(cfg, run.dev)
    except Exception as err:  # noqa: BLE001  (record and go on: one model must not end the run)
        run.note(f"{name}: build failed: {type(err).__name__}: {str(err)[:200]}")
        return None


def point(run: Suite, key: str, label: str, family: str, model, b: int, kv: int, calls: int = 10,
          **kw) -> float | None:
    """One graphed step time (eager fallback on a capture failure), as a row of ``key``."""
    opts = {k: kw[k] for k in ("overlap", "compile", "attention") if k in kw}
    t = time.time()
    try:
        ms, graphed = bench.decode_step_ms(model, b, kv, calls=calls, reps=7, **opts), True
    except Exception as err:  # noqa: BLE001
        run.note(f"{label} B={b} {opts}: {type(err).__name__}: {str(err)[:300]}")
        run.sync()
        if "compile" in opts:
            return None
        try:
            ms, graphed = bench.decode_step_ms(model, b, kv, graphs=False, calls=3, reps=3, **opts), False
        except Exception as err2:  # noqa: BLE001
            run.note(f"{label} B={b}: eager failed too: {str(err2)[:200]}")
            return None
    extra = {k: (bool(v) if k == "compile" else v) for k, v in kw.items()}
    run.add(key, bench.row(label, family, model, b, kv, ms, graphed=graphed, wall_s=round(time.time() - t, 1),
                           **extra))
    run.sync()
    return ms


def family_rows(run: Suite, family: str, names: list[str], batches: list[int], parts_for: set[str],
                extra=None) -> None:
    for name in names:
        if run.left() < 8:
            run.note(f"{family}: stopped before {name} (time budget)")
            break
        model = build(run, name)
        if model is None:
            continue
        overlap = name.startswith(("ultramem-", "tiny-ultramem"))
        moe = getattr(model.blocks[0].ffn, "path_for", None) is not None
        todo = list(batches) + (MOE_EXTRA if moe and family == "1.6b-x12" else [])
        for b in todo:
            kv = fits_kv(model, b)
            if run.left() < 5:
                run.note(f"{name}: stopped before batch {b} (time budget)")
                break
            for ov in (False, True) if overlap else (False,):
                point(run, "rows", name, family, model, b, kv, calls=5 if moe else 10, overlap=ov)
        if moe and family == "1.6b-x12":
            moe_paths(run, name, model)
        if name in parts_for:
            for b in PART_BATCHES:
                if run.left() < 6:
                    break
                kv = fits_kv(model, b)
                try:
                    run.add("parts", {"model": name, "family": family, **parts.step_parts(model, b, kv)})
                except Exception as err:  # noqa: BLE001
                    run.note(f"{name} parts B={b}: {type(err).__name__}: {str(err)[:300]}")
                    run.sync()
        if extra is not None:
            extra(run, name, model)
        del model
        run.sync()


def moe_paths(run: Suite, name: str, model) -> None:
    """The MoE's decode paths forced on either side of ``gather_max`` (whole step, same KV)."""
    cfg = model.blocks[0].ffn.cfg  # one config object shared by every block's MoE
    for impl, batches in MOE_FORCED.items():
        for b in batches:
            if run.left() < 5:
                return
            cfg.impl = impl
            try:
                point(run, "rows", f"{name} [{'grouped' if impl == 'grouped_mm' else impl}]", "1.6b-x12 moe paths",
                      model, b, fits_kv(model, b), calls=5, impl=impl)
            finally:
                cfg.impl = "auto"


def generate_rows(run: Suite, name: str, model, new: int = 128, batch: int = 1, eager: bool = True,
                  compile: bool = False) -> None:
    """``Engine.generate_ids`` of ``batch`` 32-token prompts: graphed, then (``eager``) eager;
    ``compile``: the graphed run's step through ``torch.compile`` first (then no eager run)."""
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, 32)).tolist()
    for graphs in (True, False) if eager and not compile else (True,):
        if run.left() < 6 or (graphs and run.dry):
            continue
        n = new if graphs else 32
        try:
            eng = Engine(model, batch, 32 + new, Sampling(0.0), graphs=graphs, compile=compile)
            eng.generate_ids(prompt, 8)  # warm-up (the graph is captured at the first use)
            res = eng.generate_ids(prompt, n)
        except Exception as err:  # noqa: BLE001
            run.note(f"{name} generate graphs={graphs}: {type(err).__name__}: {str(err)[:200]}")
            continue
        label = "ultramem compile+graphs" if compile else "ultramem graphs" if graphs else "ultramem eager"
        run.add("generate", {"model": name, "batch": batch, "engine": label,
                             "new_tokens": res.new_tokens, "tokens_per_s": round(res.tokens_per_s, 1),
                             "decode_tokens_per_s": round(res.steps / max(res.decode_s, 1e-9), 1),
                             "graphed": res.graphed})
        del eng
        run.sync()


def extra_16b(run: Suite, name: str, model) -> None:
    if name in ("dense-1.6b", "ultramem-1.6b-x12", "tiny-dense", "tiny-ultramem"):
        generate_rows(run, name, model)
    if len(model.memory) and run.left() > 4:
        for r in parts.our_layer(model, [1, 64]):
            run.add("layers", r)


COMPILED = ("dense-227m", "ultramem-227m-1.2b")


def compile_rows(run: Suite, name: str, model, batches=(1,)) -> None:
    """``torch.compile`` (default mode, then our graph) beside our plain graphs of the same run
    (batch 1 in the family pass; batch 64 later, time permitting)."""
    if name not in COMPILED + ("tiny-dense", "tiny-ultramem"):
        return
    opts = {"backend": "eager"} if run.dry else True
    for b in batches:
        if run.left() < 30:
            run.note(f"compile {name} B={b}: skipped (time budget)")
            return
        torch._dynamo.reset()
        point(run, "compile", name, "compile", model, b, fits_kv(model, b),
              compile=opts)


def fig6c(run: Suite, base_name: str, batches=(1, 64, 256)) -> None:
    """UltraMem with 1x/2x/4x/8x the value rows (knum * sqrt(f)) at the same top-m."""
    base = get_preset(base_name).model
    for f in (1, 2, 4, 8):
        if run.left() < 8:
            run.note(f"fig6c: stopped before {f}x (time budget)")
            return
        cfg = get_preset(base_name).model
        cfg.memory.knum = round(base.memory.knum * f**0.5)
        model = build(run, f"{base_name} x{f}", cfg)
        if model is None:
            continue
        for b in batches:
            point(run, "fig6c", f"{base_name} x{f} rows", "fig6c", model, b,
                  fits_kv(model, b),
                  value_rows_factor=f, value_params=sum(m.values.numel() for m in model.memory))
        del model
        run.sync()


def others(run: Suite) -> None:
    run.until = run.t0 + run.budget  # the rest of the budget
    for name in ("tiny-dense",) if run.dry else COMPILED:
        if run.left() < 60:
            run.note(f"compile {name} B=64: skipped (time budget)")
            continue
        model = build(run, name)
        if model is not None:
            compile_rows(run, name, model, (64,))
        del model
        run.sync()
    try:
        if run.dry:
            rows = parts.lucidrains_layer([1, 4], dim=64, num_memories=64**2, dim_values=32, dim_queries_keys=32,
                                          device="cpu")
        else:
            rows = parts.lucidrains_layer([1, 64])
        for r in rows:
            run.add("layers", r)
    except Exception as err:  # noqa: BLE001
        run.note(f"lucidrains ultra-mem: {type(err).__name__}: {str(err)[:300]}")
    run.sync()
    settings, small = HF_SETTINGS, HF_DRY_SHAPE if run.dry else None
    for r in parts.hf_generate(settings, run.left, device=run.dev, small=small):
        run.add("hf", r)


def second(run: Suite) -> None:
    """Follow-up call (decode-h200-d.json): what the first call's budget left out, each
    comparison again within this run: HF generate first, then Fig. 6(c) 1x vs 8x rows and the
    227M family's dense / V2 / OLMoE / Memory+ rows at batches 1 and 64."""
    run.path = run.path.replace("-c.json", "-d.json")
    if not run.dry:
        warm = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        t = time.time()
        while time.time() - t < 1:
            warm @ warm
    settings, small = HF_SETTINGS, HF_DRY_SHAPE if run.dry else None
    for r in parts.hf_generate(settings, lambda: run.left() - 35, device=run.dev, small=small):
        run.add("hf", r)
    base = "tiny-ultramem" if run.dry else "ultramem-227m-1.2b"
    b = (1, 4) if run.dry else (1, 64)
    SHARES["fig6c"] = 1.0
    run.section("fig6c")
    for f in (1, 8):
        cfg = get_preset(base).model
        cfg.memory.knum = round(get_preset(base).model.memory.knum * f**0.5)
        model = build(run, f"{base} x{f}", cfg)
        for bb in b:
            if model is not None and run.left() > 4:
                point(run, "fig6c", f"{base} x{f} rows", "fig6c", model, bb,
                      fits_kv(model, bb), value_rows_factor=f,
                      value_params=sum(m.values.numel() for m in model.memory))
        del model
        run.sync()
    names = TINY["227m-1.2b"] if run.dry else ["dense-227m", "ultramem-v2-227m-1.2b", "olmoe-227m-1.2b",
                                               "memory-plus-227m-1.2b"]
    family_rows(run, "227m-1.2b", names, list(b), set())
    run.save()
    print("wrote", run.path, "in", round(time.time() - run.t0), "s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=320)
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny presets on the CPU, CPU timers")
    ap.add_argument("--second", action="store_true",
                    help="the follow-up call: HF generate, Fig. 6(c) 1x vs 8x, the rest of the 227M family")
    args = ap.parse_args()
    run = Suite(args.out, args.budget_s, args.cpu_dry_run)
    names = TINY if run.dry else FULL
    if run.dry:
        bench.time_replays = parts.cpu_timer  # the graph timer's stand-in (same signature)
        parts.SCALE = 1 << 12
        BATCHES[:], MOE_EXTRA[:], PART_BATCHES[:] = [1, 4], [2], [1, 4]
        MOE_FORCED.update(gather=[16], grouped_mm=[1])
    if args.second:
        second(run)
        return
    if not run.dry:
        parts.clocks_up(2)
    run.section("ceilings")
    run.doc["ceilings"] = parts.ceilings(run.dev)
    run.save()
    print("ceilings", run.doc["ceilings"], flush=True)
    run.section("1.6b-x12")
    family_rows(run, "1.6b-x12", names["1.6b-x12"], BATCHES, set(names["1.6b-x12"]), extra_16b)
    run.section("1b-7b")
    family_rows(run, "1b-7b", names["1b-7b"], BATCHES, set(names["1b-7b"]))
    run.section("227m-1.2b")
    family_rows(run, "227m-1.2b", names["227m-1.2b"], [1, 64, 8, 256] if not run.dry else [1, 4], set(),
                compile_rows)
    run.section("fig6c")
    fig6c(run, "tiny-ultramem" if run.dry else "ultramem-227m-1.2b", (1, 4) if run.dry else (1, 64, 256))
    run.section("others")
    others(run)
    run.save()
    print("wrote", run.path, "in", round(time.time() - run.t0), "s", flush=True)


if __name__ == "__main__":
    main()
