"""The third decode sweep, one GPU call (docs/results/decode-h200-e.json; docs/inference.md): the
split-KV decode attention (``ops/decode_attention``) against masked SDPA, and the rows it moves.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/decode_splitkv.py --out $OUT --budget-s 240
    PYTHONPATH=. python3 benchmarks/decode_splitkv.py --out $OUT --hf --budget-s 150   # HF compiled
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/decode_splitkv.py --cpu-dry-run --out /tmp/x

Sections in priority order, the JSON rewritten after every row (a run cut short keeps what it
measured):

1. ceilings (copy, read-only, GEMV), as in ``decode_suite.py``;
2. ``attention``: the op alone, kernel vs masked SDPA (the model's previous decode path) in one
   process, full and ragged lengths, dense-1.6b's and dense-227m's layer shapes; the kernel's
   tile options (``TUNING.decode_attention_tile``) at batch 1 and 64;
3. ``rows``: dense-1.6b / ultramem-1.6b-x12 (overlap) at B 1 / 8 / 64 with split-KV, SDPA and
   (added after the -e call) the fused rotary + write before SDPA (``rope_sdpa``),
   moe-1.6b-2in34 at B 64 (and 1, 8); dense-1b / ultramem-v2-1b-7b / olmoe-1b-7b;
   dense-227m / ultramem-v2-227m-1.2b / ultramem-227m-1.2b; every row with its ``attention``;
4. ``parts``: where dense-1.6b's and ultramem-v2-1b-7b's step goes now;
5. ``large``: B 128 and 512-4096 for the 1.6B and 227M dense / memory rows (KV halved until the
   state fits; a batch that does not fit at KV 128 is a note);
6. ``generate``: our tokens/s at batch 1 (dense-1.6b, graphed), for the HF comparison;
7. ``--hf`` (a second invocation, its own budget, ``decode-h200-e-hf.json``): HF ``generate()``
   with a static cache and its automatic compile, then the default cache: a Llama of dense-1.6b's
   shape at batch 1, then transformers' OLMoE of olmoe-1b-7b's shape at batch 1 and 64.
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
import decode_suite as suite  # noqa: E402
from decode import fits_kv  # noqa: E402

from ultramem.inference import bench  # noqa: E402
from ultramem.ops.decode_attention import decode_attention, reference  # noqa: E402
from ultramem.ops.tuning import tuned  # noqa: E402

SK, SDPA, ROPE = "split_kv", "sdpa", "rope_sdpa"
ROWS = [  # (family, model, batches, attentions, overlap), priority order
    ("1.6b-x12", "dense-1.6b", [1, 8, 64], (SK, SDPA, ROPE), False),
    ("1.6b-x12", "ultramem-1.6b-x12", [1, 8, 64], (SK, SDPA, ROPE), True),
    ("1.6b-x12", "moe-1.6b-2in34", [64, 1, 8], (SK, ROPE), False),  # rope_sdpa: the default above B=1
    ("1b-7b", "dense-1b", [1, 8, 64], (SK,), False),
    ("1b-7b", "ultramem-v2-1b-7b", [1, 8, 64], (SK,), True),
    ("1b-7b", "olmoe-1b-7b", [64, 1], (SK,), False),
    ("227m-1.2b", "dense-227m", [1, 64], (SK,), False),
    ("227m-1.2b", "ultramem-v2-227m-1.2b", [1, 64], (SK,), True),
    ("227m-1.2b", "ultramem-227m-1.2b", [1, 64], (SK,), True),
]
LARGE = [("1.6b-x12", "dense-1.6b", False), ("1.6b-x12", "ultramem-1.6b-x12", True),
         ("227m-1.2b", "dense-227m", False), ("227m-1.2b", "ultramem-227m-1.2b", True)]
LARGE_BATCHES = [128, 512, 1024, 2048, 4096]
PARTS = [("dense-1.6b", [1, 64], (SK, SDPA)), ("ultramem-v2-1b-7b", [1], (SK,))]  # (model, batches, attentions)
ATTN_SHAPES = [(16, 16, 128, 2048), (12, 12, 64, 2048)]  # (H, H_kv, hd, L): dense-1.6b, dense-227m
ATTN_BATCHES = [1, 8, 64, 256]
TILES = [(16, 4, 1024), (32, 4, 1024), (64, 4, 1024), (64, 8, 1024), (32, 2, 1024), (32, 4, 256), (32, 4, 4096),
         (64, 4, 4096), (64, 8, 8192)]  # (BLOCK_N, num_warps, target programs)
# the dry run (TRITON_INTERPRET=1: every op's kernels interpreted) keeps memory layers on SDPA rows
TINY_ROWS = [("1.6b-x12", "tiny-dense", [1, 4], (SK, SDPA), False), ("1.6b-x12", "tiny-ultramem", [1], (SDPA,), True)]
# --hf: (decode_parts.HF_MODELS key, batch), in priority order: the Llama of dense-1.6b's shape
# against our dense-1.6b, then transformers' own OLMoE against our olmoe-1b-7b (the MoE rows)
HF_RUNS = [("llama", 1), ("olmoe", 1), ("olmoe", 64)]
HF_OURS = [("dense-1.6b", [1]), ("olmoe-1b-7b", [1, 64]), ("ultramem-1.6b-x12", [1])]  # generate, same lengths
TINY_OURS = [("tiny-dense", [1]), ("tiny-moe", [1, 4])]
HF_DRY_MOE = {"olmoe": {"num_experts": 4, "num_experts_per_tok": 2}}
HF_SETTINGS = [("HF generate, static cache (its auto compile)", {"cache_implementation": "static"}, 128),
               ("HF generate, default (dynamic) cache", {}, 32)]


def _cycled(fn, q: torch.Tensor, kvs: list, n: torch.Tensor, length: int):
    """A call of ``fn`` on the next of the ``kvs`` cache copies each time."""
    turn = [0]

    def call() -> None:
        k, v = kvs[turn[0] % len(kvs)]
        turn[0] += 1
        fn(q, k, v, n, length)

    return call


def attention_ab(run: suite.Suite, shapes, batches, tiles) -> None:
    """The op alone: split-KV kernel vs masked SDPA on the same inputs (bf16), full lengths and
    ragged ones (uniform in [1, L]); bytes = the K/V a call must read (all L, or the lengths).
    Small caches are replicated (``copies``, cycled call by call) so that the 20 calls of a
    graph read more than the 60 MB L2, as a model's layers do."""
    dev, dt = run.dev, torch.bfloat16 if run.dev == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    for h, h_kv, d, length in shapes:
        for b in batches:
            if run.left() < 4:
                run.note(f"attention: stopped before H={h} B={b} (time budget)")
                return
            one = 2 * b * h_kv * length * d * 2
            copies = 1 if run.dry else max(1, min(8, -(-(256 << 20) // one)))
            q = torch.randn(b, h, d, device=dev, dtype=dt, generator=g)
            kvs = [tuple(torch.randn(b, h_kv, length, d, device=dev, dtype=dt, generator=g) for _ in range(2))
                   for _ in range(copies)]
            for lengths in ("full", "ragged"):
                n = (torch.full((b,), length, device=dev) if lengths == "full"
                     else torch.randint(1, length + 1, (b,), device=dev, generator=g))
                kv_bytes = 2 * int(n.sum()) * h_kv * d * 2
                ms_k = bench.time_replays(_cycled(decode_attention, q, kvs, n, length), calls=20, reps=11)
                ms_s = bench.time_replays(_cycled(reference.decode_attention, q, kvs, n, length), calls=20, reps=11)
                k, v = kvs[0]
                err = (decode_attention(q, k, v, n, length).float()
                       - reference.decode_attention(q.float(), k.float(), v.float(), n, length)).abs().max().item()
                run.add("attention", {"H": h, "H_kv": h_kv, "hd": d, "L": length, "batch": b, "lengths": lengths,
                                      "split_kv_us": round(ms_k * 1e3, 2), "sdpa_us": round(ms_s * 1e3, 2),
                                      "speedup": round(ms_s / ms_k, 2), "kv_bytes": kv_bytes, "copies": copies,
                                      "split_kv_GBps": round(kv_bytes / ms_k / 1e6, 1),
                                      "sdpa_GBps": round(kv_bytes / ms_s / 1e6, 1), "max_abs_err_vs_fp32": err})
            if b in (1, 64) and (h, h_kv, d, length) == shapes[0]:
                n = torch.full((b,), length, device=dev)
                for tile in tiles:
                    if run.left() < 3:
                        return
                    with tuned(decode_attention_tile=tile):
                        ms = bench.time_replays(_cycled(decode_attention, q, kvs, n, length), calls=20, reps=9)
                    run.add("tiles", {"H": h, "hd": d, "L": length, "batch": b, "tile": list(tile),
                                      "us": round(ms * 1e3, 2), "GBps": round(one / ms / 1e6, 1)})
            del q, kvs
            run.sync()


def model_rows(run: suite.Suite, rows) -> None:
    for family, name, batches, attentions, overlap in rows:
        if run.left() < 8:
            run.note(f"rows: stopped before {name} (time budget)")
            return
        model = suite.build(run, name)
        if model is None:
            continue
        moe = getattr(model.blocks[0].ffn, "path_for", None) is not None
        for b in batches:
            kv = fits_kv(model, b)
            for attention in attentions:
                if run.left() < 4:
                    run.note(f"rows: {name} stopped before B={b} {attention} (time budget)")
                    break
                suite.point(run, "rows", name, family, model, b, kv, calls=5 if moe else 10, overlap=overlap,
                            attention=attention)
        for pname, pbatches, pattn in PARTS:
            if not (pname == name or (run.dry and name == "tiny-dense" and pname == PARTS[0][0])):
                continue
            for b in pbatches if not run.dry else [1]:
                for attention in pattn:
                    if run.left() < 6:
                        break
                    kv = fits_kv(model, b)
                    try:
                        run.add("parts", {"model": name, "family": family, "attention": attention,
                                          **parts.step_parts(model, b, kv, attention=attention)})
                    except Exception as err:  # noqa: BLE001
                        run.note(f"{name} parts B={b}: {type(err).__name__}: {str(err)[:300]}")
                        run.sync()
        if name in ("dense-1.6b", "tiny-dense"):
            suite.generate_rows(run, name, model)
        del model
        run.sync()


def large_rows(run: suite.Suite, models, batches) -> None:
    """Batches past 256 (and 128), split-KV; KV halved from 2048 until weights + state fit."""
    for family, name, overlap in models:
        if run.left() < 10:
            run.note(f"large: stopped before {name} (time budget)")
            return
        model = suite.build(run, name)
        if model is None:
            continue
        for b in batches:
            kv = fits_kv(model, b)
            if kv == 0:
                run.note(f"large: {name} B={b} does not fit (weights + KV state at KV 128 exceed 128 GB)")
                continue
            if run.left() < 6:
                run.note(f"large: {name} stopped before B={b} (time budget)")
                break
            suite.point(run, "rows", name, family, model, b, kv, calls=3, overlap=overlap, attention=SK)
        del model
        run.sync()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny presets on the CPU (interpreter), CPU timers")
    ap.add_argument("--hf", action="store_true", help="HF generate() with a static cache + its compile only")
    ap.add_argument("--rows", type=int, default=0,
                    help="a follow-up call: the ceilings and the first N model rows only (decode-h200-f.json)")
    ap.add_argument("--tag", default="", help="the output's letter: decode-h200-<tag>[-hf].json (default e, f with --rows)")
    args = ap.parse_args()
    run = suite.Suite(args.out, args.budget_s, args.cpu_dry_run)
    stem = ("decode-dry-" if run.dry else "decode-h200-") + (args.tag or ("f" if args.rows else "e"))
    run.path = os.path.join(args.out, stem + ("-hf" if args.hf else "") + ".json")
    for key in ("attention", "tiles"):
        run.doc[key] = []
    if run.dry:
        bench.time_replays = parts.cpu_timer
        parts.SCALE = 1 << 12
    if args.hf:
        for name, batches in (TINY_OURS if run.dry else HF_OURS):  # ours at the same lengths, same run
            model = suite.build(run, name)
            for b in batches if model is not None else ():
                suite.generate_rows(run, name, model, batch=b, eager=run.dry)
            del model
            run.sync()
        for arch, batch in HF_RUNS:
            small = suite.HF_DRY_SHAPE | HF_DRY_MOE.get(arch, {}) if run.dry else None
            for r in parts.hf_generate(HF_SETTINGS, run.left, device=run.dev, small=small, arch=arch, batch=batch):
                run.add("hf", r)
        run.save()
        print("wrote", run.path, flush=True)
        return
    if not run.dry:
        parts.clocks_up(1.5)
    run.doc["ceilings"] = parts.ceilings(run.dev)
    run.save()
    print("ceilings", json.dumps(run.doc["ceilings"]), flush=True)
    if args.rows:
        run.until = run.t0 + run.budget
        model_rows(run, (TINY_ROWS if run.dry else ROWS)[:args.rows])
        run.save()
        print("wrote", run.path, "in", round(time.time() - run.t0), "s", flush=True)
        return
    shares = {"attention": 0.12, "rows": 0.55, "large": 0.33}
    run.until = run.t0 + shares["attention"] * run.budget + 5
    if run.dry:
        attention_ab(run, [(4, 2, 32, 64)], [1, 4], TILES[:2])
    else:
        attention_ab(run, ATTN_SHAPES, ATTN_BATCHES, TILES)
    run.until = time.time() + shares["rows"] * run.budget
    model_rows(run, TINY_ROWS if run.dry else ROWS)
    run.until = run.t0 + run.budget
    large_rows(run, [("1.6b-x12", "tiny-dense", False)] if run.dry else LARGE, [8] if run.dry else LARGE_BATCHES)
    run.save()
    print("wrote", run.path, "in", round(time.time() - run.t0), "s", flush=True)


if __name__ == "__main__":
    main()
