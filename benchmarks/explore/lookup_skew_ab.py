"""Probe: why was ``lookup pkm256 skewed bwd`` slower after the session-4 kernel reorganisation?

docs/results/ops-ab-h200-2026-12-01.json: 0.49-0.60 ms before (30159a3), 0.69-0.89 ms after
(0a41563 / 5d32449). The lookup-reduce kernels and their host code are the same in both (the
``@triton.jit`` bodies, ``_fwd_blocks``, ``_dense_blocks``, ``dense_prep`` and
``scatter_rows``' dense path compare equal after renaming); what changed is what ran before the
row in the same process: the old ``benchmarks/ops.py`` timed the uniform case's backward three
times (``dense``, then ``sort`` and ``atomic``, which zero-fill a bf16 and allocate an fp32 copy
of the whole 1 M x 256 table) before the skewed row. This script times the skewed backward
(exactly as ``ops.py`` does: ``do_bench`` of ``torch.autograd.grad``) under each preceding
state, interleaved over rounds, and its parts (score gradients, the int32 sort, the row
scatter), so one run says whether the difference is the code or the measurement context.

    PYTHONPATH=. python3 benchmarks/explore/lookup_skew_ab.py --out $OUT      # H200, ~1 min
    PYTHONPATH=. python benchmarks/explore/lookup_skew_ab.py --smoke          # CPU, interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--out", default="")
ARGS.add_argument("--rounds", type=int, default=4)
ARGS.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the interpreter")
OPTS = ARGS.parse_args()
if OPTS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ for _bench
import _bench  # noqa: E402
import torch  # noqa: E402

from ultramem.ops._dispatch import load  # noqa: E402
from ultramem.ops.lookup_reduce import BACKWARD, lookup_reduce  # noqa: E402

SMOKE = OPTS.smoke
DEV = "cpu" if SMOKE else "cuda"
DT = torch.float32 if SMOKE else torch.bfloat16
T, N, P, D = (16, 8, 1 << 10, 32) if SMOKE else (4096, 32, 1 << 20, 256)  # ops.py's pkm256


def timeit(fn) -> float:
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def case(dist: str) -> dict:
    values = (torch.randn(P, D, device=DEV, dtype=DT) * 0.02).requires_grad_()
    s = torch.randn(T, N, 1, device=DEV, dtype=DT).requires_grad_()
    idx = _bench.make_idx(dist, T, N, P, DEV)
    out = lookup_reduce(values, idx, s, impl="triton")
    return {"values": values, "s": s, "idx": idx, "out": out, "g": torch.randn_like(out)}


def bwd(c: dict) -> None:
    torch.autograd.grad(c["out"], [c["values"], c["s"]], c["g"], retain_graph=True)


def parts(c: dict) -> dict[str, float]:
    """The backward's pieces, each timed alone (private kernel functions: a probe)."""
    k = load(BACKWARD)
    v, idx, s, g = c["values"].detach(), c["idx"], c["s"].detach(), c["g"].contiguous()
    w = s.float().contiguous()
    return {
        "scores_ms": timeit(lambda: k.backward_scores(v, idx, s, None, 1, None, None, "identity", g)),
        "sort_ms": timeit(lambda: torch.sort(idx.reshape(-1).to(torch.int32), stable=True)),
        "scatter_ms": timeit(lambda: k.scatter_rows(P, idx, w, None, 1, g, v.dtype)),
    }


def old_bench_state() -> None:
    """What the old ops.py ran between the uniform dense and the skewed row: a zero-filled bf16
    table (``sort``) and an fp32 copy of the table (``atomic``), both freed."""
    a = torch.zeros(P, D, device=DEV, dtype=DT)
    b = torch.zeros(P, D, device=DEV, dtype=torch.float32)
    b.add_(1.0)
    del a, b


def main() -> None:
    torch.manual_seed(0)
    _bench.warm_up(0 if SMOKE else 5.0, DEV)
    uni, skew = case("uniform"), case("skewed")
    hot = torch.bincount(skew["idx"].reshape(-1), minlength=P)
    states = {
        "after nothing (cache emptied)": lambda: torch.cuda.empty_cache() if DEV == "cuda" else None,
        "after the uniform bwd (new ops.py order)": lambda: bwd(uni),
        "after uniform bwd + old sort/atomic tables (old ops.py order)": lambda: (bwd(uni), old_bench_state()),
    }
    rows = []
    for r in range(OPTS.rounds):
        for label, before in states.items():
            before()
            if DEV == "cuda":
                torch.cuda.synchronize()
            ms = timeit(lambda: bwd(skew))
            rows.append({"round": r, "state": label, "skewed_bwd_ms": round(ms, 5)})
            print(f"round {r}  {label:<64} skewed bwd {ms * 1e3:8.1f} us", flush=True)
    split = {d: {k: round(v, 5) for k, v in parts(c).items()} for d, c in (("uniform", uni), ("skewed", skew))}
    print(json.dumps(split))
    doc = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter smoke)",
        "torch": torch.__version__, "command": "PYTHONPATH=. python3 benchmarks/explore/lookup_skew_ab.py "
        + " ".join(sys.argv[1:]),
        "shape": {"T": T, "n": N, "P": P, "D_v": D, "dtype": str(DT)},
        "hot_rows": {"max_count": int(hot.max()), "rows_over_32": int((hot > 32).sum())},
        "rows": rows, "parts": split,
    }
    if OPTS.out:
        Path(OPTS.out).mkdir(parents=True, exist_ok=True)
        (Path(OPTS.out) / "lookup-skew-ab.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
