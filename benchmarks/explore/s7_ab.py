"""Two A/Bs in one process (session 7, H200): the memory layers' side-stream priority under
overlap, and the one-token GEMV kernel (``skinny_linear``) against ``F.linear`` per projection
shape of our presets (what decides where the kernel should run).

    PYTHONPATH=. python3 benchmarks/explore/s7_ab.py --out $OUT   # -> s7-ab-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from ultramem.inference import bench  # noqa: E402
from ultramem.ops.skinny_linear import triton as sk  # noqa: E402
from ultramem.ops.tuning import tuned  # noqa: E402
from ultramem.presets import get_preset  # noqa: E402

PRIORITY = [("dense-1b", False), ("ultramem-v2-1b-7b", True), ("dense-227m", False), ("ultramem-v2-227m-1.2b", True),
            ("ultramem-1.6b-x12", True)]
PRIORITY_BATCHES = [1, 8, 64]
SHAPES = [(2048, 2048), (8192, 2048), (2048, 8192), (8216, 2048), (2048, 8216), (5504, 2048), (2048, 5504),
          (50432, 2048), (50304, 2048), (1024, 2048), (384, 2048), (2048, 768), (768, 768), (3096, 768), (768, 3096)]


def gemv_us(fn, n: int, k: int) -> float:
    """Graph replay us of ``fn(x, w)`` cycling weight copies past the 60 MB L2."""
    copies = max(2, min(16, (256 << 20) // (n * k * 2)))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    turn = [0]

    def call() -> None:
        fn(x, ws[turn[0] % copies])
        turn[0] += 1

    return bench.time_replays(call, 4 * copies, 15) * 1e3


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    t0 = time.time()
    path = os.path.join(args.out, "s7-ab-h200.json")
    doc = {"device": torch.cuda.get_device_name(), "command": " ".join(["python3"] + sys.argv),
           "torch": torch.__version__, "gemv": [], "priority": []}

    def save() -> None:
        doc["seconds"] = round(time.time() - t0, 1)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)

    for n, k in SHAPES:
        kern, lin = gemv_us(sk.skinny_linear, n, k), gemv_us(F.linear, n, k)
        doc["gemv"].append({"N": n, "K": k, "MB": round(n * k * 2 / 1e6, 1), "skinny_us": round(kern, 2),
                            "linear_us": round(lin, 2), "skinny_GBps": round(n * k * 2 / kern / 1e3),
                            "linear_GBps": round(n * k * 2 / lin / 1e3)})
        print(doc["gemv"][-1], flush=True)
        save()
    for name, overlap in PRIORITY:
        cfg = get_preset(name).model
        cfg.dropout = 0.0
        model = bench.build(cfg)
        for b in PRIORITY_BATCHES:
            for prio in (0, -1) if overlap else (0,):
                with tuned(overlap_stream_priority=prio):
                    ms = bench.decode_step_ms(model, b, 2048, overlap=overlap, calls=10, reps=9)
                doc["priority"].append({"model": name, "batch": b, "overlap": overlap, "priority": prio,
                                        "ms": round(ms, 4)})
                print(doc["priority"][-1], flush=True)
                save()
        del model
        torch.cuda.empty_cache()
    save()
    print("wrote", path, "in", round(time.time() - t0), "s")


if __name__ == "__main__":
    main()
