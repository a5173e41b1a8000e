"""Op benchmarks: lookup-reduce and retrieval, reference vs ``embedding_bag`` vs the Triton kernels,
plus a whole UltraMem layer at decode (1.6B-x12 size) and a training step (151M-x12 size).

Only the public op API: each op at ``impl="torch"`` (the PyTorch reference) and ``impl="triton"``
(the kernels at their default tuning). On the GPU, in one process: the device's copy bandwidth
first, then every shape. Writes ``<out>/ops-<device>.json`` (rows ``{op, impl, direction, shape,
ms, bytes, GBps, frac_of_copy}`` plus ``device``, ``copy_GBps``, ``command``) and
``<out>/ops-<device>.png``.

    PYTHONPATH=. python3 benchmarks/ops.py --out docs/results

CPU smoke run of every code path (tiny shapes, Triton interpreter, no JSON; under a minute):

    PYTHONPATH=. .venv/bin/python benchmarks/ops.py --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--out", default="docs/results")
ARGS.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the interpreter")
ARGS.add_argument("--skip-module", action="store_true", help="do not time the UltraMem module")
ARGS.add_argument("--only", default="", help="comma-separated section-name substrings to run")
ARGS.add_argument("--replot", default="", help="redraw the PNG of this JSON (no GPU needed)")
OPTS = ARGS.parse_args()
if OPTS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import _bench  # noqa: E402  (benchmarks/_bench.py)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ultramem.ops.key_scores import key_scores  # noqa: E402
from ultramem.ops.lookup_reduce import lookup_reduce  # noqa: E402
from ultramem.ops.retrieval import ive_address, tucker_topk  # noqa: E402
from ultramem.ops.skinny_linear import skinny_linear  # noqa: E402

SMOKE = OPTS.smoke
DEV = "cpu" if SMOKE else "cuda"
BF16 = torch.float32 if SMOKE else torch.bfloat16  # the interpreter has no bf16 dots; fine here
ROWS: list[dict] = []
COPY = {"GBps": float("nan")}


def timeit(fn, graph: bool = False, grad_to_none=None) -> float:
    """Median ms: CUDA-graph replay for decode-sized work, else ``do_bench``."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    if graph:
        return _bench.graph_time(fn)
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=60, grad_to_none=grad_to_none,
                                   return_mode="median")


def record(op, impl, direction, shape, ms, nbytes) -> None:
    gbps = nbytes / ms / 1e6
    row = {"op": op, "impl": impl, "direction": direction, "shape": shape, "ms": round(ms, 5),
           "bytes": int(nbytes), "GBps": round(gbps, 1),
           "frac_of_copy": round(gbps / COPY["GBps"], 3)}
    ROWS.append(row)
    print(f"{op:>14} {impl:>15} {direction} {ms * 1e3:10.1f} us {gbps:8.0f} GB/s "
          f"{row['frac_of_copy']:6.2f}  {shape}", flush=True)


def copy_bandwidth() -> None:
    COPY["GBps"] = _bench.copy_gbps(DEV, BF16, timeit, (1 << 16) if SMOKE else (1 << 29))


# ---- lookup-reduce -------------------------------------------------------------------------
def bench_lookup(name, t, n, p, d, hc, e, dp=0, act="identity", dist="uniform", bwd=True,
                 graph=False, ebag=False) -> None:
    el = torch.finfo(BF16).bits // 8
    values = (torch.randn(p, d, device=DEV, dtype=BF16) * 0.02)
    idx = _bench.make_idx(dist, t, n, p, DEV)
    s = torch.randn(t, n, hc, device=DEV, dtype=BF16)
    blk = torch.randint(0, e, (t, n), device=DEV) if e > 1 else None
    u = torch.randn(p, dp, device=DEV, dtype=BF16) * 0.05 if dp else None
    q = torch.randn(t, dp, device=DEV, dtype=BF16) if dp else None
    sel = t * n
    shape = {"name": name, "T": t, "n": n, "P": p, "D_v": d, "h_c": hc, "E": e, "D_p": dp,
             "act": act, "idx": dist, "dtype": str(BF16).replace("torch.", "")}
    fwd_bytes = sel * (d * el + 8 + hc * el + dp * el + (8 if e > 1 else 0)) + t * e * d * el + t * dp * el
    # backward: rows re-read for the score gradients, selected gradient rows written, dO read,
    # score grads, and the dense zero-fill of the [P, D_v] gradient (a dense parameter grad)
    bwd_bytes = (sel * (2 * d * el + 8 + 2 * hc * el + 3 * dp * el) + t * e * d * el
                 + p * (d + dp) * el + t * dp * el)
    impls = ["torch", "triton"] + (["embedding_bag"] if ebag and e == 1 and hc == 1 and not dp else [])
    for impl in impls:
        def fwd(impl=impl, v=values, sc=s, uu=u, qq=q):
            if impl == "embedding_bag":
                return F.embedding_bag(idx, v, per_sample_weights=sc[..., 0], mode="sum")
            return lookup_reduce(v, idx, sc, blk, e, uu, qq, act, impl=impl)

        with torch.no_grad():
            record("lookup_reduce", impl, "fwd", shape, timeit(fwd, graph), fwd_bytes)
        if not bwd:
            continue
        if impl == "embedding_bag":  # no bf16 per_sample_weights backward: values only
            leaves = [values.detach().requires_grad_()]
            lv = {"v": leaves[0]}
        else:
            leaves = [x.detach().requires_grad_() for x in (values, s, u, q) if x is not None]
            lv = dict(zip(["v", "sc", "uu", "qq"][: len(leaves)], leaves))
        out = fwd(**lv)
        g = torch.randn_like(out)
        ms = timeit(lambda out=out, g=g, lv=leaves: torch.autograd.grad(out, lv, g, retain_graph=True))
        record("lookup_reduce", impl, "bwd", shape, ms, bwd_bytes)


# ---- retrieval -----------------------------------------------------------------------------
def bench_retrieval(rows_b, heads, n, r, hc, k, m, graph) -> None:
    s_row = torch.randn(rows_b, heads, n, r, device=DEV, dtype=BF16)
    s_col = torch.randn(rows_b, heads, n, r, device=DEV, dtype=BF16)
    cores = torch.randn(hc, r, r, device=DEV)
    uu, _, vh = torch.linalg.svd(cores.sum(0))
    cores, u, v = cores.to(BF16), uu[:, 0].to(BF16).contiguous(), vh[0].to(BF16).contiguous()
    shape = {"B": rows_b, "H": heads, "N": n, "r": r, "h_c": hc, "k": k, "m": m}
    nbytes = 2 * s_row.numel() * s_row.element_size()
    for impl in ("torch", "triton"):
        with torch.no_grad():
            ms = timeit(lambda impl=impl: tucker_topk(s_row, s_col, cores, u, v, k, m, impl=impl),
                        graph)
        record("tucker_topk", impl, "fwd", shape, ms, nbytes)


# ---- whole layer, composed from the ops ----------------------------------------------------
class ComposedLayer:
    """UltraMem (v1) layer from the ops, as ``ultramem.layers`` composes it (math.md §3): query
    projection (``skinny_linear``), query LayerNorm + TDQKR key scores (``key_scores``),
    ``tucker_topk``, IVE address map, ``lookup_reduce``, output projection. Shared query, 2
    heads. ``impl="torch"``: every op's reference (``F.linear``, ``F.layer_norm`` + one matmul
    a side, ...)."""

    def __init__(self, d, knum, e, key_dim, r, hc, heads, m, k, dv, grad=False):
        self.p, self.n = knum * knum, math.isqrt(e) * knum
        self.e, self.kd, self.r, self.hc, self.h, self.m, self.k = e, key_dim, r, hc, heads, m, k
        kw = dict(device=DEV, dtype=BF16)
        self.wq = torch.randn(2 * key_dim, d, **kw) * d**-0.5
        self.lnw, self.lnb = torch.ones(key_dim, **kw), torch.zeros(key_dim, **kw)
        self.keys = torch.randn(2, heads, self.n, r, key_dim, **kw) * key_dim**-0.5
        cores = torch.randn(hc, r, r, device=DEV)
        uu, _, vh = torch.linalg.svd(cores.sum(0))
        self.cores, self.u, self.v = cores.to(BF16), uu[:, 0].to(BF16), vh[0].to(BF16)
        self.perm = torch.randperm(self.n * self.n, device=DEV).to(torch.int32)  # as the layer
        self.values = torch.randn(self.p, dv, **kw) * 0.02
        self.wo = torch.randn(d, e * dv, **kw) * (e * dv) ** -0.5
        self.params = [self.wq, self.lnw, self.lnb, self.keys, self.cores, self.values, self.wo]
        for x in self.params:
            x.requires_grad_(grad)

    STAGES = ("query proj", "key scores", "tucker_topk", "ive_address", "lookup_reduce",
              "out proj")

    def __call__(self, x: torch.Tensor, impl: str, stop: int = 99) -> torch.Tensor:
        """The layer; ``stop`` = number of :data:`STAGES` to run (timing prefixes)."""
        b = x.shape[0]
        q = skinny_linear(x, self.wq, impl=impl)
        if stop < 2:
            return q
        s_row, s_col = key_scores(q.view(b, 1, 2, 1, self.kd), self.keys, "layernorm", self.lnw,
                                  self.lnb, impl=impl)  # [1, B, H, N, r] each
        if stop < 3:
            return s_row, s_col
        scores, addr = tucker_topk(s_row[0], s_col[0], self.cores, self.u, self.v, self.k, self.m,
                                   impl=impl)
        if stop < 4:
            return scores
        rows, blk = ive_address(addr.view(b, -1), self.perm, self.p, impl=impl)
        if stop < 5:
            return rows
        pooled = lookup_reduce(self.values, rows, scores.reshape(b, -1, self.hc), blk, self.e,
                               impl=impl)
        if stop < 6:
            return pooled
        return skinny_linear(pooled.view(b, -1), self.wo, impl=impl)


def bench_layer_decode(batches) -> None:
    if SMOKE:
        layer = ComposedLayer(64, 12, 4, 16, 2, 2, 2, 6, 6, 32)
    else:  # UltraMem-1.6B-x12 layer: D 2048, Knum 1792 (P 3.2M), E 4, K 448, 2 x top-42, D_v 1024
        layer = ComposedLayer(2048, 1792, 4, 448, 2, 2, 2, 42, 42, 1024)
    for b in batches:
        x = torch.randn(b, layer.wq.shape[1], device=DEV, dtype=BF16)
        shape = {"layer": "ultramem-1.6b-x12", "B": b, "P": layer.p, "N": layer.n, "m": layer.m}
        # the selected value rows, the key table and the two projections' weights
        nbytes = 2 * (b * layer.h * layer.m * layer.values.shape[1] + layer.keys.numel()
                      + layer.wq.numel() + layer.wo.numel())
        for impl in ("torch", "triton"):
            with torch.no_grad():
                ms = timeit(lambda impl=impl, x=x: layer(x, impl), graph=b <= 64)
            record("layer_decode", impl, "fwd", shape, ms, nbytes)
            if b <= 64 and not SMOKE:  # weights evicted between calls, as in a whole model
                with torch.no_grad():
                    ms = _bench.cold_graph_time(lambda impl=impl, x=x: layer(x, impl))
                record("layer_decode", impl + " (L2 cold)", "fwd", shape, ms, nbytes)
        if b <= 64:  # where the time goes: CUDA-graph time of each prefix of the stages
            for impl in ("torch", "triton"):
                for stop in range(1, len(ComposedLayer.STAGES) + 1):
                    with torch.no_grad():
                        ms = timeit(lambda x=x, impl=impl, stop=stop: layer(x, impl, stop), graph=True)
                    record("layer_decode_prefix", impl, "fwd",
                           {**shape, "stages": stop, "last": ComposedLayer.STAGES[stop - 1]}, ms,
                           nbytes)


def bench_train_step() -> None:
    if SMOKE:
        layer, t = ComposedLayer(64, 12, 4, 16, 2, 2, 2, 4, 4, 32, grad=True), 16
    else:  # UltraMem-151M-x12 layer: D 1024, Knum 1100, E 4, K 256, 2 x top-16, D_v 512
        layer, t = ComposedLayer(1024, 1100, 4, 256, 2, 2, 2, 16, 16, 512, grad=True), 16384
    x = torch.randn(t, layer.wq.shape[1], device=DEV, dtype=BF16, requires_grad=True)
    gy = torch.randn(t, layer.wq.shape[1], device=DEV, dtype=BF16)
    shape = {"layer": "ultramem-151m-x12", "T": t, "P": layer.p, "N": layer.n, "m": layer.m}
    nbytes = t * layer.h * layer.m * layer.values.shape[1] * 2 * 3 + layer.values.numel() * 2
    for impl in ("torch", "triton"):
        def step(impl=impl, layer=layer):
            layer(x, impl).backward(gy)

        record("layer_train_step", impl, "fwd+bwd", shape,
               timeit(step, grad_to_none=layer.params + [x]), nbytes)


def bench_module(batches) -> None:
    """The UltraMem layer module as the model builds it, impl torch vs triton."""
    from ultramem.layers.registry import ShapeContext
    from ultramem.presets.memory import ultramem_paper

    size = 1600
    for impl in ("torch", "triton"):
        cfg = ultramem_paper(size, impl=impl) if not SMOKE else ultramem_paper(size, impl=impl, knum=12, key_dim=16, topk=4, calib_samples=8)
        shape_ctx = ShapeContext(d_model=64 if SMOKE else 2048, n_layers=34, n_mem_layers=6)
        with torch.device(DEV):
            mod = cfg.build(shape_ctx)
        mod.init_weights()
        mod = mod.to(BF16).eval()
        for b in batches:
            x = torch.randn(b, 1, shape_ctx.d_model, device=DEV, dtype=BF16)
            with torch.no_grad():
                ms = timeit(lambda x=x, mod=mod: mod(x), graph=b <= 64)
            record("module_decode", impl, "fwd", {"layer": "UltraMem 1.6B-x12 module", "B": b},
                   ms, 0)


def plot(path: str, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(22, 8), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    ax = axes[0]
    lk = [r for r in ROWS if r["op"] == "lookup_reduce"]
    labels = [f"{r['shape']['name']} T{r['shape']['T']} {r['shape']['idx'][:4]} {r['direction']} {r['impl']}" for r in lk]
    ax.barh(range(len(lk)), [r["frac_of_copy"] for r in lk],
            color=["C0" if r["impl"].startswith("triton") else "C1" if r["impl"] == "torch" else "C2"
                   for r in lk])
    ax.set_yticks(range(len(lk)), labels, fontsize=7)
    ax.axvline(0.8, ls="--", c="k", lw=0.8)
    ax.axvline(0.4, ls=":", c="k", lw=0.8)
    ax.set_xlabel(f"fraction of copy bandwidth ({COPY['GBps']:.0f} GB/s)")
    ax.set_title("lookup-reduce (blue: Triton, orange: reference, green: embedding_bag)")
    ax = axes[1]
    for impl, c in (("torch", "C1"), ("triton", "C0")):
        pts = [(r["shape"]["B"], r["ms"] * 1e3) for r in ROWS if r["op"] == "layer_decode" and r["impl"] == impl]
        if pts:
            ax.plot(*zip(*pts), "o-", c=c, label=f"composed layer, {impl}")
        pts = [(r["shape"]["B"], r["ms"] * 1e3) for r in ROWS if r["op"] == "module_decode" and r["impl"] == impl]
        if pts:
            ax.plot(*zip(*pts), "s--", c=c, label=f"UltraMem module, {impl}")
    ax.axhline(25, ls="--", c="k", lw=0.8, label="target 25 us")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("decode batch")
    ax.set_ylabel("us per layer call (CUDA-graph replay)")
    ax.set_title("UltraMem-1.6B-x12 memory layer, decode")
    ax.legend(fontsize=7)
    ax = axes[2]  # where a decode call's time goes: differences of the prefix timings
    pre = [r for r in ROWS if r["op"] == "layer_decode_prefix"]
    bars = sorted({(r["impl"], r["shape"]["B"]) for r in pre}, key=lambda x: (x[0], x[1]))
    for y, (impl, b) in enumerate(bars):
        rs = sorted((r for r in pre if r["impl"] == impl and r["shape"]["B"] == b),
                    key=lambda r: r["shape"]["stages"])
        left = 0.0
        for i, r in enumerate(rs):
            width = max(r["ms"] * 1e3 - left, 0.0)
            ax.barh(y, width, left=left, color=f"C{i}",
                    label=r["shape"]["last"] if y == 0 else None)
            left += width
    ax.set_yticks(range(len(bars)), [f"{impl} B {b}" for impl, b in bars])
    ax.axvline(25, ls="--", c="k", lw=0.8)
    ax.set_xlabel("us (CUDA-graph time of each stage prefix, stacked differences)")
    ax.set_title("decode layer call by stage")
    ax.legend(fontsize=7)
    fig.suptitle(device)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def warm_up(seconds: float) -> None:
    """Clocks ramped before a section is timed (without this the first variants of a section
    measured up to 2x slower than the same kernel a second later)."""
    _bench.warm_up(seconds, DEV)


def section(name, fn, *a) -> None:
    print(f"== {name}", flush=True)
    warm_up(0.5)
    t0 = time.time()
    try:
        fn(*a)
    except Exception:  # noqa: BLE001 -- one failed section must not lose the others
        traceback.print_exc()
        ROWS.append({"op": name, "error": traceback.format_exc(limit=3)[-800:]})
    if not SMOKE:
        torch.cuda.empty_cache()
    print(f"   ({time.time() - t0:.1f} s)", flush=True)


def _triton_version() -> str:
    import triton

    return triton.__version__


def write(device: str, slug: str, final: bool = False) -> None:
    """JSON after every section (a crash keeps what was measured), PNG at the end."""
    if SMOKE:
        return
    os.makedirs(OPTS.out, exist_ok=True)
    cmd = "PYTHONPATH=. python3 benchmarks/ops.py " + " ".join(sys.argv[1:])
    doc = {"device": device, "copy_GBps": round(COPY["GBps"], 1), "command": cmd,
           "torch": torch.__version__, "triton": _triton_version(), "complete": final,
           "rows": ROWS}
    path = os.path.join(OPTS.out, f"ops-{slug}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    if final:
        plot(os.path.join(OPTS.out, f"ops-{slug}.png"), device)
        print("wrote", path)


def replot(path: str) -> None:
    with open(path) as f:
        doc = json.load(f)
    ROWS.extend(r for r in doc["rows"] if "error" not in r)
    COPY["GBps"] = doc["copy_GBps"]
    plot(path[: -len(".json")] + ".png", doc["device"])


def main() -> None:
    if OPTS.replot:
        replot(OPTS.replot)
        return
    device = "cpu-smoke" if SMOKE else torch.cuda.get_device_name()
    slug = "cpu" if SMOKE else next((w.lower() for w in device.split() if w[:1] in "HABL" and w[1:2].isdigit()), "gpu")
    torch.manual_seed(0)
    warm_up(2.0)
    copy_bandwidth()
    mb = 1 << 10 if SMOKE else 1 << 20
    sections = [
        ("layer decode", bench_layer_decode, [1] if SMOKE else [1, 4, 16, 64, 4096]),
        ("tucker_topk decode", lambda: [bench_retrieval(b, 2, 100 if SMOKE else 3584, 2, 2, 8 if SMOKE else 42, 8 if SMOKE else 42, True) for b in ((1,) if SMOKE else (1, 8, 64))]),
        ("lookup decode", lambda: [bench_lookup("decode1.6b", b, 84, mb if SMOKE else 1792**2, 128 if SMOKE else 1024, 2, 4, bwd=False, graph=True) for b in (1, 64)]),
        ("lookup pkm-256", lambda: [bench_lookup("pkm256", 16 if SMOKE else 4096, 32, mb, 64 if SMOKE else 256, 1, 1, dist=dd, ebag=True) for dd in ("uniform", "skewed")]),
        ("lookup ive-mcs", lambda: [bench_lookup("ive4-mcs2", 16 if SMOKE else 1024, 84, mb, 128 if SMOKE else 1024, 2, 4, dist=dd) for dd in ("uniform", "skewed")]),
        ("lookup v2", lambda: bench_lookup("v2-gelu", 16 if SMOKE else 4096, 32, mb, 48 if SMOKE else 384, 1, 1, dp=16 if SMOKE else 128, act="gelu")),
        ("lookup train151m", lambda: bench_lookup("train151m", 16 if SMOKE else 16384, 32, mb if SMOKE else 1100**2, 64 if SMOKE else 512, 2, 4)),
        ("tucker_topk train", lambda: bench_retrieval(16 if SMOKE else 16384, 2, 100 if SMOKE else 2200, 2, 2, 8 if SMOKE else 16, 8 if SMOKE else 16, False)),
        ("train step", bench_train_step),
    ]
    if not OPTS.skip_module:
        sections.append(("module decode", bench_module, [1] if SMOKE else [1, 64]))
    only = [w for w in OPTS.only.split(",") if w]
    for name, fn, *a in sections:
        if only and not any(w in name for w in only):
            continue
        section(name, fn, *a)
        write(device, slug)
    write(device, slug, final=True)
    errors = [r for r in ROWS if "error" in r]
    if SMOKE:
        print(json.dumps(errors, indent=1)[:3000])
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
