"""Lookup-reduce backward sweep: the value-gradient methods (dense, sort, atomic) on the GPU.

In one process: the copy bandwidth (1 GiB bf16 ``copy_``, read + write bytes, as
``benchmarks/ops.py``), then for each shape (train151m, ive4, v2-gelu, pkm256 uniform and skewed)

- a check that the ``dense`` and ``sort`` value gradients agree (bf16 allclose), both from
  ``scatter_rows`` alone and through autograd (``d values``, and ``d pre_values`` for V2);
- per method, the whole backward, ``torch.autograd.grad(out, leaves, g, retain_graph=True)``
  (score gradients + value gradient (+ pre-value gradients)), as ``bench_lookup`` times it;
- per method, the value gradient alone (``scatter_rows``) and its preprocessing alone
  (``dense_prep``: int32 sort + prep kernel; ``sort_prep``: int64 sort + two searchsorted);
- the score-gradient kernel alone (``backward_scores``), for the split of the whole backward;
- ``scatter_rows`` dense tile variants (``BLOCK_R,BLOCK_D,num_warps,UNROLL``; the first of
  ``TILE_VARIANTS`` is the default, timed as ``dense``) on train151m and pkm256-skewed, and
  ``DENSE_PIECE`` variants on pkm256-skewed (``--no-variants`` skips them).

Timing: ``triton.testing.do_bench(..., return_mode="median")`` (L2 flushed between repetitions).
Bytes: whole backward as ``benchmarks/ops.py`` (rows re-read + gradient rows + dO + score
grads + the dense ``[P, D_v]`` gradient write, i.e. the zero-fill counted once);
``scatter_rows``: ``sel (D_v el + 8 + 4 h_c (+ 8 with IVE)) + P D_v el`` (dO rows gathered,
index, fp32 weight (, block), dense gradient written); ``prep``: the index read only (8 sel),
so its GB/s is not a bandwidth figure, read its ms; ``bwd_scores``: ``sel (2 D_v el + 8 +
2 h_c el) + T E D_v el``. Writes ``<out>/lr_bwd_sweep.json``: rows ``{op, impl, shape, ms,
bytes, GBps, frac_of_copy}`` plus ``device``, ``copy_GBps``, ``command``, ``checks``.

    PYTHONPATH=. python3 benchmarks/lr_bwd_sweep.py --out docs/results

CPU smoke run of every code path (tiny shapes, Triton interpreter, fp32; JSON only with --out):

    PYTHONPATH=. .venv/bin/python benchmarks/lr_bwd_sweep.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--out", default=None, help="output folder (default docs/results on the GPU)")
ARGS.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the interpreter")
ARGS.add_argument("--only", default="", help="comma-separated shape-name substrings to run")
ARGS.add_argument("--no-variants", action="store_true", help="skip the dense tile/piece variants")
OPTS = ARGS.parse_args()
if OPTS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"

import _bench  # noqa: E402  (benchmarks/_bench.py)
import torch  # noqa: E402
import triton  # noqa: E402

import ultramem.ops.lookup_reduce as lr  # noqa: E402
import ultramem.ops.lookup_reduce.triton as lrk  # noqa: E402
from ultramem.ops.lookup_reduce import lookup_reduce  # noqa: E402

SMOKE = OPTS.smoke
DEV = "cpu" if SMOKE else "cuda"
BF16 = torch.float32 if SMOKE else torch.bfloat16  # the interpreter: fp32 (as benchmarks/ops.py)
METHODS = ("dense", "sort", "atomic")
ROWS: list[dict] = []
CHECKS: dict[str, str] = {}
COPY = {"GBps": float("nan")}
T0 = time.time()

# name, T, n, P, D_v, h_c, E, D_p, activation, index distribution, dense variants ("tiles",
# "pieces")
SHAPES = [
    ("train151m", 16384, 32, 1100**2, 512, 2, 4, 0, "identity", "uniform", ("tiles",)),
    ("ive4", 1024, 84, 1 << 20, 1024, 2, 4, 0, "identity", "uniform", ()),
    ("v2-gelu", 4096, 32, 1 << 20, 384, 1, 1, 128, "gelu", "uniform", ()),
    ("pkm256", 4096, 32, 1 << 20, 256, 1, 1, 0, "identity", "uniform", ()),
    ("pkm256", 4096, 32, 1 << 20, 256, 1, 1, 0, "identity", "skewed", ("tiles", "pieces")),
]
SMOKE_SHAPES = [
    ("train151m", 48, 8, 700, 32, 2, 4, 0, "identity", "uniform", ("tiles",)),
    ("v2-gelu", 32, 8, 500, 24, 1, 1, 16, "gelu", "uniform", ()),
    ("pkm256", 64, 8, 300, 16, 1, 1, 0, "identity", "skewed", ("tiles", "pieces")),
]
# dense kernel tile variants "BLOCK_R,BLOCK_D,num_warps,UNROLL" (the first is the default)
TILE_VARIANTS = ["16,256,4,2", "16,256,4,1", "8,512,4,2", "32,256,8,2", "8,256,2,2"]
PIECE_VARIANTS = [16, 64]
SMOKE_TILES, SMOKE_PIECES = ["16,256,4,2", "4,16,2,1"], [3]


def timeit(fn) -> float:
    """Median ms (``do_bench``, L2 flushed); on the smoke run one timed call after a warm call."""
    if SMOKE:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def record(op, impl, shape, ms, nbytes) -> None:
    gbps = nbytes / ms / 1e6
    row = {"op": op, "impl": impl, "shape": shape, "ms": round(ms, 5), "bytes": int(nbytes),
           "GBps": round(gbps, 1), "frac_of_copy": round(gbps / COPY["GBps"], 3)}
    ROWS.append(row)
    print(f"{op:>18} {impl:>22} {ms * 1e3:10.1f} us {gbps:8.0f} GB/s {row['frac_of_copy']:6.3f}  "
          f"{shape['name']}-{shape['idx']}", flush=True)


def copy_bandwidth() -> None:
    COPY["GBps"] = _bench.copy_gbps(DEV, BF16, timeit, (1 << 16) if SMOKE else (1 << 29))


def warm_up(seconds: float) -> None:
    _bench.warm_up(seconds, DEV)


def make_idx(dist: str, t: int, n: int, p: int) -> torch.Tensor:
    return _bench.make_idx(dist, t, n, p, DEV)


def check_close(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """dense vs sort, bf16 allclose: both are one rounding of an fp32 sum (the same sum in the
    same order for rows below both methods' piece sizes)."""
    scale = b.float().abs().max().item() + 1e-30
    try:
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-5 * scale)
        diff = (a.float() - b.float()).abs().max().item()
        CHECKS[name] = f"ok (max |dense - sort| {diff:.3g}, max |sort| {scale:.3g})"
    except AssertionError as err:
        CHECKS[name] = "FAILED: " + str(err)[:600]
    print(f"   check {name}: {CHECKS[name][:200]}", flush=True)


def bench_shape(name, t, n, p, d, hc, e, dp, act, dist, variants) -> None:
    el = torch.finfo(BF16).bits // 8
    torch.manual_seed(0)
    values = torch.randn(p, d, device=DEV, dtype=BF16) * 0.02
    idx = make_idx(dist, t, n, p)
    s = torch.randn(t, n, hc, device=DEV, dtype=BF16)
    blk = torch.randint(0, e, (t, n), device=DEV) if e > 1 else None
    u = torch.randn(p, dp, device=DEV, dtype=BF16) * 0.05 if dp else None
    q = torch.randn(t, dp, device=DEV, dtype=BF16) if dp else None
    sel = t * n
    shape = {"name": name, "T": t, "n": n, "P": p, "D_v": d, "h_c": hc, "E": e, "D_p": dp,
             "act": act, "idx": dist, "dtype": str(BF16).replace("torch.", "")}
    key = f"{name}-{dist}"
    bwd_bytes = (sel * (2 * d * el + 8 + 2 * hc * el + 3 * dp * el) + t * e * d * el
                 + p * (d + dp) * el + t * dp * el)
    sc_bytes = sel * (d * el + 8 + 4 * hc + (8 if e > 1 else 0)) + p * d * el
    leaves = [x.detach().requires_grad_() for x in (values, s, u, q) if x is not None]
    lv, ls = leaves[0], leaves[1]
    lu, lq = (leaves[2], leaves[3]) if dp else (None, None)
    out = lookup_reduce(lv, idx, ls, blk, e, lu, lq, act, impl="triton")
    g = torch.randn_like(out)

    # the value-gradient inputs exactly as the autograd backward builds them
    ds, a, ddot = lrk.backward_scores(values, idx, s, blk, e, u, q, act, g)
    w = (s.float() if a is None else s.float() * a.unsqueeze(-1)).contiguous()
    blk_c = blk.contiguous() if blk is not None else None

    def scatter(method):
        return lrk.scatter_rows(p, idx, w, blk_c, e, g, BF16, method)

    # correctness first: dense == sort (scatter_rows alone and through autograd)
    check_close(f"{key} scatter_rows", scatter("dense"), scatter("sort"))
    grads = {}
    for method in ("dense", "sort"):
        lr.DV_METHOD = method
        grads[method] = torch.autograd.grad(out, leaves, g, retain_graph=True)
    check_close(f"{key} autograd d_values", grads["dense"][0], grads["sort"][0])
    if dp:
        check_close(f"{key} autograd d_pre_values", grads["dense"][2], grads["sort"][2])
    del grads

    for method in METHODS:  # the whole backward
        lr.DV_METHOD = method
        ms = timeit(lambda: torch.autograd.grad(out, leaves, g, retain_graph=True))
        record("lookup_reduce_bwd", method, shape, ms, bwd_bytes)
    lr.DV_METHOD = lr.DEFAULT_DV_METHOD
    ms = timeit(lambda: lrk.backward_scores(values, idx, s, blk, e, u, q, act, g))
    record("bwd_scores", "triton", shape, ms,
           sel * (2 * d * el + 8 + 2 * hc * el) + t * e * d * el)
    for method in METHODS:  # the value gradient alone, and its preprocessing
        record("scatter_rows", method, shape, timeit(lambda m=method: scatter(m)), sc_bytes)
    record("prep", "dense", shape, timeit(lambda: lrk.dense_prep(p, idx, w, blk_c, e)), 8 * sel)
    record("prep", "sort", shape, timeit(lambda: lrk.sort_prep(idx)), 8 * sel)

    if OPTS.no_variants:
        return
    tiles, pieces = (SMOKE_TILES, SMOKE_PIECES) if SMOKE else (TILE_VARIANTS, PIECE_VARIANTS)
    if "tiles" in variants:
        for cfg in tiles[1:]:
            lrk.DENSE_BLOCKS = cfg
            record("scatter_rows", f"dense[{cfg}]", shape, timeit(lambda: scatter("dense")),
                   sc_bytes)
        lrk.DENSE_BLOCKS = None
    if "pieces" in variants:
        default_piece = lrk.DENSE_PIECE
        for piece in pieces:
            lrk.DENSE_PIECE = piece
            record("scatter_rows", f"dense[piece {piece}]", shape,
                   timeit(lambda: scatter("dense")), sc_bytes)
        lrk.DENSE_PIECE = default_piece


def write(device: str, final: bool) -> None:
    out_dir = OPTS.out if OPTS.out is not None else (None if SMOKE else "docs/results")
    if out_dir is None:
        return
    os.makedirs(out_dir, exist_ok=True)
    doc = {"device": device, "copy_GBps": round(COPY["GBps"], 1),
           "command": "PYTHONPATH=. python3 benchmarks/lr_bwd_sweep.py " + " ".join(sys.argv[1:]),
           "torch": torch.__version__, "triton": triton.__version__, "complete": final,
           "defaults": {"DV_METHOD": lr.DEFAULT_DV_METHOD, "DENSE_PIECE": lrk.DENSE_PIECE,
                        "DENSE_BLOCKS": TILE_VARIANTS[0], "SORT_PIECE": lrk.SORT_PIECE},
           "seconds": round(time.time() - T0, 1), "checks": CHECKS, "rows": ROWS}
    path = os.path.join(out_dir, "lr_bwd_sweep.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    if final:
        print("wrote", path)


def summary() -> None:
    print("\nwhole backward, fraction of copy bandwidth (dense / sort / atomic):")
    for r in ROWS:
        if r["op"] == "lookup_reduce_bwd" and r["impl"] == "dense":
            sh = r["shape"]
            fr = {x["impl"]: x["frac_of_copy"] for x in ROWS
                  if x["op"] == "lookup_reduce_bwd" and x["shape"] == sh}
            print(f"  {sh['name']:>10}-{sh['idx']:<8} " + " / ".join(f"{fr.get(m, float('nan')):.3f}"
                                                         for m in METHODS))
    bad = {k: v for k, v in CHECKS.items() if not v.startswith("ok")}
    print("checks:", "all ok" if not bad else bad)


def main() -> None:
    device = "cpu-smoke" if SMOKE else torch.cuda.get_device_name()
    if not lrk.DENSE_BLOCKS:  # the "dense" rows run the default tiles, labelled TILE_VARIANTS[0]
        assert ",".join(map(str, lrk._dense_blocks(512))) == TILE_VARIANTS[0]
    warm_up(2.0)
    copy_bandwidth()
    only = [w for w in OPTS.only.split(",") if w]
    for name, *rest in (SMOKE_SHAPES if SMOKE else SHAPES):
        if only and not any(w in f"{name}-{rest[-2]}" for w in only):
            continue
        print(f"== {name} {rest[-2]}", flush=True)
        warm_up(0.5)
        t0 = time.time()
        try:
            bench_shape(name, *rest)
        except Exception:  # noqa: BLE001 -- one failed shape must not lose the others
            traceback.print_exc()
            ROWS.append({"op": f"{name}-{rest[-2]}", "error": traceback.format_exc(limit=3)[-800:]})
        lr.DV_METHOD = lr.DEFAULT_DV_METHOD
        if not SMOKE:
            torch.cuda.empty_cache()
        print(f"   ({time.time() - t0:.1f} s)", flush=True)
        write(device, final=False)
    summary()
    write(device, final=True)
    print(f"total {time.time() - T0:.1f} s")
    if any("error" in r for r in ROWS):
        sys.exit(1)


if __name__ == "__main__":
    main()
