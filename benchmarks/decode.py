"""Decode benchmark behind docs/results/decode-<device>.json (GPU; ``--plot`` runs anywhere).

    PYTHONPATH=. python3 benchmarks/decode.py --out $OUT --budget-s 240      # measure
    python3 benchmarks/decode.py --plot docs/results/decode-h200.json          # figures

One process, one device, one run: the copy-bandwidth ceiling, then the three families of
issue 12 (each with its dense model of the same active FLOPs), every point a CUDA-graph replay
of the engine's whole decode step (``ultramem.inference.bench``), UltraMem / UltraMemV2 also
with the memory layers overlapped on a side stream; the value-row sweep of UltraMem Fig. 6(c);
``generate`` tokens/s at batch 1 against Hugging Face ``generate()`` with its static cache on a
Llama of dense-1.6b's shape. Points run in priority order under ``--budget-s`` and the JSON is
rewritten after each one, so a run cut short keeps what it measured. KV 2048 unless the state
does not fit (``kv`` halves until it does; the row says which).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ultramem.inference import bench  # noqa: E402
from ultramem.presets import get_preset  # noqa: E402

FAMILIES = {
    "1.6b-x12": ["dense-1.6b", "ultramem-1.6b-x12", "moe-1.6b-2in34", "pkm-1.6b-x12"],
    "1b-7b": ["dense-1b", "ultramem-v2-1b-7b", "olmoe-1b-7b"],
    "227m-1.2b": ["dense-227m", "ultramem-227m-1.2b", "ultramem-v2-227m-1.2b", "olmoe-227m-1.2b",
                  "memory-plus-227m-1.2b"],
}
BATCHES = [1, 8, 64, 256, 32, 128, 512, 1024, 4096]  # priority order (sorted in the figures)
MEMORY_TAGS = ("ultramem-", "ultramem-v2-")
GPU_BYTES = 128e9  # what weights + state may take (of the H200's ~139 GiB)


class Run:
    def __init__(self, out: str, budget_s: float, suffix: str = "") -> None:
        self.path = os.path.join(out, f"decode-{device_tag()}{suffix}.json")
        self.t0, self.budget = time.time(), budget_s
        self.doc: dict = {"device": torch.cuda.get_device_name(), "command": " ".join(["python3"] + sys.argv),
                          "rows": [], "generate": [], "fig6c": [], "notes": []}

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def save(self) -> None:
        self.doc["seconds"] = round(time.time() - self.t0, 1)
        with open(self.path, "w") as f:
            json.dump(self.doc, f, indent=1)


def device_tag() -> str:
    name = torch.cuda.get_device_name().lower()
    return next((t for t in ("h200", "h100", "a100", "l4") if t in name), name.split()[-1])


def fits_kv(model, batch: int, kv: int | None = None) -> int:
    """Largest kv <= ``kv`` (halving; default: 2048, or the model's context if shorter) whose
    weights + K/V + logits fit ``GPU_BYTES``."""
    cfg = model.cfg
    kv = min(2048, cfg.max_seq_len) if kv is None else kv
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    while kv >= 128:
        state = len(model.blocks) * 2 * batch * kv * cfg.kv_heads * cfg.head_dim * 2
        if weights + state + 4 * batch * cfg.vocab_size * 4 < GPU_BYTES:
            return kv
        kv //= 2
    return 0


def measure_family(run: Run, family: str, names: list[str], share: float) -> None:
    for name in names:
        t_model = time.time()
        model_budget = min(run.left(), share / len(names) * 1.5)
        try:
            model = bench.build(get_preset(name).model)
        except Exception as err:  # noqa: BLE001  (record and go on: one model must not end the run)
            run.doc["notes"].append(f"{name}: build failed: {err}")
            continue
        overlap_too = name.startswith(MEMORY_TAGS)
        for b in BATCHES:
            if time.time() - t_model > model_budget or run.left() < 5:
                run.doc["notes"].append(f"{name}: stopped before batch {b} (time budget)")
                break
            kv = fits_kv(model, b)
            if kv == 0:
                continue
            for overlap in ((False, True) if overlap_too else (False,)):
                try:
                    ms = bench.decode_step_ms(model, b, kv, overlap=overlap, calls=10, reps=7)
                    graphed = True
                except Exception as err:  # noqa: BLE001
                    run.doc["notes"].append(f"{name} B={b} overlap={overlap}: {type(err).__name__}: {str(err)[:200]}")
                    torch.cuda.synchronize()
                    try:
                        ms, graphed = bench.decode_step_ms(model, b, kv, overlap=overlap, graphs=False, calls=5, reps=3), False
                    except Exception as err2:  # noqa: BLE001
                        run.doc["notes"].append(f"{name} B={b}: eager failed too: {str(err2)[:200]}")
                        continue
                r = bench.row(name, family, model, b, kv, ms, overlap=overlap, graphed=graphed)
                run.doc["rows"].append(r)
                print(json.dumps(r), flush=True)
                run.save()
                torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


def measure_generate(run: Run, names: list[str], new: int = 128, eager: bool = True) -> None:
    """``Engine.generate_ids`` at batch 1 (graphed and eager) on a 32-token prompt."""
    from ultramem.inference.engine import Engine  # noqa: PLC0415
    from ultramem.inference.sampling import Sampling  # noqa: PLC0415

    for name in names:
        if run.left() < 20:
            break
        model = bench.build(get_preset(name).model)
        prompt = [torch.randint(0, 50000, (32,)).tolist()]
        for graphs in (True, False) if eager else (True,):
            eng = Engine(model, 1, 32 + new, Sampling(0.0), graphs=graphs)
            eng.generate_ids(prompt, 8)  # warm-up (capture happens at the first bucket use)
            res = eng.generate_ids(prompt, new if graphs else 32)
            r = {"model": name, "batch": 1, "engine": "ultramem graphs" if graphs else "ultramem eager",
                 "new_tokens": res.new_tokens, "tokens_per_s": round(res.tokens_per_s, 1),
                 "decode_tokens_per_s": round(res.steps / max(res.decode_s, 1e-9), 1), "graphed": res.graphed}
            run.doc["generate"].append(r)
            print(json.dumps(r), flush=True)
            run.save()
            del eng
        del model
        torch.cuda.empty_cache()


def measure_today(run: Run, old_tree: str, new: int = 32) -> None:
    """Today's path (before this engine: ``torch.cat`` KV dict, eager) from ``old_tree``."""
    if not os.path.isdir(old_tree) or run.left() < 20:
        return
    code = (
        "import time, torch\n"
        "from ultramem.model.transformer import Transformer\n"
        "from ultramem.presets import get_preset\n"
        "from ultramem.inference.generate import generate\n"
        "m = Transformer.build(get_preset('dense-1.6b').model, 'cuda').to(torch.bfloat16).eval()\n"
        "p = torch.randint(0, 50000, (32,)).tolist()\n"
        f"generate(m, p, 4, temperature=0); torch.cuda.synchronize(); t = time.perf_counter()\n"
        f"out = generate(m, p, {new}, temperature=0); torch.cuda.synchronize()\n"
        "print(len(out) / (time.perf_counter() - t))\n"
    )
    try:
        res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": old_tree},
                             capture_output=True, text=True, timeout=max(run.left() - 5, 10))
        if res.returncode:
            raise RuntimeError(f"exit {res.returncode}: {res.stderr[-300:]}")
        tps = float(res.stdout.strip().splitlines()[-1])
        r = {"model": "dense-1.6b", "batch": 1, "engine": "today (torch.cat cache, eager; 30159a3)",
             "tokens_per_s": round(tps, 1)}
        run.doc["generate"].append(r)
        print(json.dumps(r), flush=True)
    except Exception as err:  # noqa: BLE001
        run.doc["notes"].append(f"today's path: {err}")
    run.save()


def measure_hf(run: Run) -> None:
    """``benchmarks/decode_hf.py`` in a subprocess, killed at the time budget."""
    if run.left() < 30:
        run.doc["notes"].append("HF generate: skipped (time budget)")
        return
    script = os.path.join(os.path.dirname(__file__), "decode_hf.py")
    try:
        res = subprocess.run([sys.executable, script], capture_output=True, text=True,
                             timeout=min(run.left() - 10, 35))
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        run.doc["generate"] += [json.loads(ln) for ln in lines]
        print("\n".join(lines), flush=True)
        if res.returncode:
            run.doc["notes"].append(f"HF generate: exit {res.returncode}: {res.stderr[-300:]}")
    except subprocess.TimeoutExpired as err:
        got = [ln for ln in (err.stdout or b"").decode().splitlines() if ln.startswith("{")]
        run.doc["generate"] += [json.loads(ln) for ln in got]
        run.doc["notes"].append("HF generate: stopped at the time budget")
    run.save()


def measure_fig6c(run: Run, batches=(1, 64, 256)) -> None:
    """UltraMem-227M with 1x/2x/4x/8x the value rows (knum * sqrt(f)) at the same top-m."""
    base = get_preset("ultramem-227m-1.2b").model
    for f in (1, 2, 4, 8):
        if run.left() < 10:
            run.doc["notes"].append(f"fig6c: stopped before {f}x (time budget)")
            break
        cfg = get_preset("ultramem-227m-1.2b").model
        cfg.memory.knum = round(base.memory.knum * f**0.5)
        model = bench.build(cfg)
        for b in batches:
            ms = bench.decode_step_ms(model, b, 2048, calls=10, reps=7)
            r = bench.row(f"ultramem-227m-1.2b x{f} rows", "fig6c", model, b, 2048, ms, value_rows_factor=f,
                          value_params=sum(m.values.numel() for m in model.memory))
            run.doc["fig6c"].append(r)
            print(json.dumps(r), flush=True)
            run.save()
        del model
        torch.cuda.empty_cache()


def measure(args: argparse.Namespace) -> None:
    run = Run(args.out, args.budget_s, args.suffix)
    if args.batches:
        BATCHES[:] = args.batches
    if args.only:
        for fam in FAMILIES:
            FAMILIES[fam] = [n for n in FAMILIES[fam] if n in args.only]
    warm = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    t = time.time()
    while time.time() - t < 2:  # clocks up
        warm @ warm
    torch.cuda.synchronize()
    run.doc["copy_GBps"] = round(bench.copy_gbps(), 1)
    run.doc["copy_counts"] = "read + write bytes of a 1 GiB bf16 device-to-device copy"
    print("copy GB/s", run.doc["copy_GBps"], flush=True)
    run.save()
    plan = [(fam, FAMILIES[fam]) for fam in args.families]
    for fam, names in plan[:1]:  # the first family named gets the largest share of the budget
        measure_family(run, fam, names, 0.35 * args.budget_s)
    if not args.skip_generate:
        measure_generate(run, args.generate, eager=not args.no_eager)
        measure_hf(run)
        measure_today(run, args.old_tree)
    for fam, names in plan[1:]:
        measure_family(run, fam, names, 0.2 * args.budget_s)
    if not args.skip_fig6c:
        measure_fig6c(run, tuple(args.fig6c_batches))
    run.save()
    print("wrote", run.path, "in", round(time.time() - run.t0), "s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--old-tree", default="old", help="checkout of the pre-engine package (today's path)")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--generate", nargs="+", default=["dense-1.6b", "ultramem-1.6b-x12"], help="presets for tokens/s")
    ap.add_argument("--no-eager", action="store_true", help="generate tokens/s with graphs only")
    ap.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes, in priority order")
    ap.add_argument("--only", nargs="+", default=None, help="presets to keep in the families")
    ap.add_argument("--suffix", default="", help="JSON name suffix (decode-<device><suffix>.json)")
    ap.add_argument("--fig6c-batches", nargs="+", type=int, default=[1, 64, 256])
    ap.add_argument("--skip-fig6c", action="store_true")
    ap.add_argument("--plot", default=None, help="draw the figures of this JSON (no GPU needed)")
    args = ap.parse_args()
    if args.plot:
        from decode_plot import plot  # noqa: PLC0415

        plot(args.plot)
        return
    measure(args)


if __name__ == "__main__":
    main()
