"""Key scores at decode: the PyTorch reference (LayerNorm + einsum) against the fused kernel.

The UltraMem-1.6B-x12 decode shape: ``q [T, 1, 2, 1, 448]`` (the two heads share one query),
``keys [2, 2, 3584, 2, 448]`` bf16 (25.7 MB, read once per call), LayerNorm with affine, for
T in 1, 4, 16, 64. Each kernel configuration is checked against the fp64 reference first (the
tests' rule: error at most twice the bf16 reference's), then timed by CUDA-graph replay
(``_bench.graph_time``): the default tiles, the ``VARIANTS`` (``ULTRAMEM_KS_BLOCKS`` strings
``BLOCK_M,TB,num_warps[,BK]``), PDL on, and the pair query projection + key scores (where PDL
can overlap the key read with the projection). Rows ``{op, impl, T, us}`` (+ ``GBps`` of the
key read) go to ``<out>/key-scores-<device>.json``.

    PYTHONPATH=. python3 benchmarks/key_scores_bench.py --out $OUT          # GPU
    PYTHONPATH=. .venv/bin/python benchmarks/key_scores_bench.py --smoke    # CPU interpreter
    PYTHONPATH=. .venv/bin/python benchmarks/key_scores_bench.py --compile-check  # sm_90 regs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__" and "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

sys.path.insert(0, os.path.dirname(__file__))
import _bench  # noqa: E402  (benchmarks/_bench.py)
import torch  # noqa: E402
import triton  # noqa: E402

import ultramem.ops.key_scores.triton as ksk  # noqa: E402
from ultramem.ops.key_scores import key_scores, reference  # noqa: E402

TOKENS = (1, 4, 16, 64)
SHAPE = dict(h=2, n=3584, r=2, k=448, d_model=2048)  # 1.6B-x12 (d_model: the projection input)
SMOKE_SHAPE = dict(h=2, n=37, r=2, k=40, d_model=24)
VARIANTS = {  # T -> ULTRAMEM_KS_BLOCKS strings timed besides the default tiles
    1: ["8,1,4", "32,1,4", "32,1,8", "64,1,8"],
    4: ["16,1,4", "32,16,4,32", "64,16,4,64", "128,16,8,32"],
    16: ["32,16,4,32", "64,16,4,64", "128,16,8,32", "128,16,4,32"],
    64: ["64,64,4,32", "64,64,8,64", "128,64,8,32", "32,64,4,32"],
}
ROWS: list[dict] = []


def inputs(t: int, shape: dict, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator(device=device).manual_seed(t)
    kw = dict(device=device, generator=g)
    h, n, r, k = shape["h"], shape["n"], shape["r"], shape["k"]
    return dict(q=torch.randn(t, 1, 2, 1, k, **kw).to(dtype),
                keys=(torch.randn(2, h, n, r, k, **kw) / k**0.5).to(dtype),
                weight=(1 + 0.1 * torch.randn(k, **kw)).to(dtype),
                bias=(0.1 * torch.randn(k, **kw)).to(dtype))


def call(x: dict, impl: str):
    return key_scores(x["q"], x["keys"], "layernorm", x["weight"], x["bias"], impl=impl)


def check(x: dict) -> str:
    """``""`` when the kernel is within the rule against the fp64 reference, else why not."""
    ours = call(x, "triton")
    same = reference.key_scores(x["q"], x["keys"], "layernorm", x["weight"], x["bias"])
    exact = reference.key_scores(*(x[n].double() for n in ("q", "keys")), "layernorm",
                                 x["weight"].double(), x["bias"].double())
    for o, s, e in zip(ours, same, exact):
        err, base = (o.double() - e).abs().max().item(), (s.double() - e).abs().max().item()
        if not err <= 2 * base + 1e-6 * e.abs().max().item():
            return f"kernel err {err:.3g} vs reference err {base:.3g}"
    return ""


def timed(fn, smoke: bool) -> float:
    """Microseconds per call: CUDA-graph replay on the GPU; one timed call in the smoke run."""
    if smoke:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return _bench.graph_time(fn) * 1e3


def record(op: str, impl: str, t: int, us: float, nbytes: int, **extra) -> None:
    row = {"op": op, "impl": impl, "T": t, "us": round(us, 2),
           "GBps": round(nbytes / us / 1e3, 1), **extra}
    ROWS.append(row)
    print(f"{op:>16} {impl:>26} T {t:3d} {us:9.2f} us {row['GBps']:8.0f} GB/s "
          f"{extra.get('error', '')}", flush=True)


def bench_tokens(t: int, smoke: bool) -> None:
    """All rows of one token count."""
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    shape = SMOKE_SHAPE if smoke else SHAPE
    x = inputs(t, shape, device, dtype)
    nbytes = x["keys"].nbytes
    record("key_scores", "torch", t, timed(lambda: call(x, "torch"), smoke), nbytes)
    configs = [("triton", None, False), *((f"triton {b}", b, False) for b in VARIANTS[t]),
               ("triton pdl", None, True)]
    for name, blocks, pdl in configs:
        ksk.BLOCKS, ksk.USE_PDL = blocks, pdl
        try:
            bad = check(x)
            us = float("nan") if bad else timed(lambda: call(x, "triton"), smoke)
            record("key_scores", name, t, us, nbytes, **({"error": bad} if bad else {}))
        except Exception as exc:  # noqa: BLE001 -- report and go on
            record("key_scores", name, t, float("nan"), nbytes, error=repr(exc)[:300])
        finally:
            ksk.BLOCKS, ksk.USE_PDL = None, False
    # in context: the query projection (cuBLAS) then the scores; PDL may overlap the two
    w_q = torch.randn(2 * shape["k"], shape["d_model"], device=device, dtype=dtype)
    xin = torch.randn(t, shape["d_model"], device=device, dtype=dtype)

    def pair(impl: str):
        q = (xin @ w_q.t()).view(t, 1, 2, 1, shape["k"])
        return call({**x, "q": q}, impl)

    record("proj+key_scores", "torch", t, timed(lambda: pair("torch"), smoke), nbytes)
    for name, pdl in (("triton", False), ("triton pdl", True)):
        ksk.USE_PDL = pdl
        try:
            record("proj+key_scores", name, t, timed(lambda: pair("triton"), smoke), nbytes)
        except Exception as exc:  # noqa: BLE001
            record("proj+key_scores", name, t, float("nan"), nbytes, error=repr(exc)[:300])
        finally:
            ksk.USE_PDL = False


# ---- compile check: sm_90 from the CPU ---------------------------------------------------------
def usage(ck) -> str:
    """Registers / stack / local memory of the cubin (cuobjdump) and the spill bytes of
    ``ptxas -v`` (the ptxas this Triton uses for sm_90) on its PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    out = []
    with tempfile.TemporaryDirectory() as d:
        cubin, ptx = os.path.join(d, "k.cubin"), os.path.join(d, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(ck.asm["ptx"])
        txt = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", cubin],
                             capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", txt)
        out.append(f"regs {m[1]} stack {m[2]} local {m[4]}" if m else "regs ?")
        txt = subprocess.run([get_ptxas(90).path, "--gpu-name=sm_90a", "-v", ptx, "-o",
                              os.path.join(d, "v.cubin")], capture_output=True, text=True).stderr
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)
        out.append(f"spills {m[1]}/{m[2]} B" if m else "spills ?")
    p = ck.asm["ptx"]
    mma = "wgmma" if "wgmma" in p else ("mma.sync" if "mma.sync" in p else "fma")
    return (" ".join(out) + f", dyn smem {ck.metadata.shared} B, {mma}"
            + (", griddepcontrol.wait" if "griddepcontrol.wait" in p else "")
            + (", prefetch.L2" if "prefetch.global.L2" in p else ""))


def compile_check(args) -> int:
    print(f"compile-check for sm_90, Triton {triton.__version__}", flush=True)
    m = dict(device="meta", dtype=torch.bfloat16)
    h, n, r, k = SHAPE["h"], SHAPE["n"], SHAPE["r"], SHAPE["k"]
    fails = 0
    for t in TOKENS:
        q, keys = torch.empty(t, 1, 2, 1, k, **m), torch.empty(2, h, n, r, k, **m)
        w, b, out = torch.empty(k, **m), torch.empty(k, **m), torch.empty(2, 1, t, h, n, r, **m)
        for blocks in [None, *VARIANTS[t]]:
            for pdl in (False, True):
                ksk.BLOCKS, ksk.USE_PDL = blocks, pdl
                cfg = ksk._blocks(t, k)
                grid, a, kw = ksk._launch(q, keys, "layernorm", w, b, 1e-5, out)
                try:
                    res = usage(_bench.compile_sm90(ksk._key_scores_kernel, a, kw))
                except Exception as exc:  # noqa: BLE001 -- report every failing config
                    fails += 1
                    res = "FAIL " + " | ".join(str(exc).splitlines()[:3])
                finally:
                    ksk.BLOCKS, ksk.USE_PDL = None, False
                name = "default" if blocks is None else blocks
                print(f"T {t:2d} {name:>12} {tuple(cfg)} pdl {int(pdl)} grid {grid}: {res}",
                      flush=True)
    return 1 if fails else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, interpreter")
    ap.add_argument("--compile-check", action="store_true", help="sm_90 compile on the CPU")
    args = ap.parse_args()
    ksk.USE_KERNEL = True  # off by default in the library (see triton.USE_KERNEL); timed here
    if args.compile_check:
        return compile_check(args)
    if not args.smoke:
        _bench.warm_up(2.0)
    with torch.no_grad():
        for t in TOKENS:
            bench_tokens(t, args.smoke)
    if args.smoke:
        return 1 if any("error" in r for r in ROWS) else 0
    dev = torch.cuda.get_device_name().replace(" ", "-").lower()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"key-scores-{dev}.json")
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__,
                   "command": " ".join(sys.argv), "rows": ROWS}, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
