"""Where one UltraMemV2 memory layer's decode time goes, kernel by kernel (session 7, H200).

    PYTHONPATH=. python3 benchmarks/explore/v2_chain.py --out $OUT [--preset ultramem-v2-1b-7b]

For layer 0 of the preset (random weights, bf16) at batches 1 / 8 / 64, one decode token:

- ``kernels``: torch.profiler over eager calls of the whole layer: every kernel it launches
  with its mean device time (what the chain is made of);
- ``pieces``: CUDA-graph replay time of each piece alone (query projection, query norm + key
  scores, the three top-m launches, the ring address map, pre-value projection, lookup-reduce,
  output projection) and of the whole layer, and of an empty one-element kernel (the floor a
  dependent launch costs in a graph);
- ``grid_chunk``: the Tucker top-m at this layer's shape with other grid chunk sizes (the
  candidates a grid program rescores; ``GRID_CHUNK_FEW`` is 512 for rows <= 256).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ultramem.inference import bench  # noqa: E402
from ultramem.ops.lookup_reduce import lookup_reduce  # noqa: E402
from ultramem.ops.retrieval import triton as rk  # noqa: E402
from ultramem.ops.retrieval import tucker_topk  # noqa: E402
from ultramem.ops.skinny_linear import skinny_linear  # noqa: E402
from ultramem.presets import get_preset  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of the script (tiny preset)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def kernel_table(fn, calls: int = 10) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if DEV == "cuda" else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        sync()
    rows = []
    for e in prof.key_averages():
        dev = (getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0) if DEV == "cuda"
               else e.self_cpu_time_total)
        if dev <= 0 or e.count < calls:
            continue
        rows.append({"kernel": e.key[:120], "per_call": round(e.count / calls, 2),
                     "us_per_call": round(dev / calls, 2)})
    return sorted(rows, key=lambda r: -r["us_per_call"])


@torch.no_grad()
def batch_row(mem, d_model: int, b: int) -> dict:
    """Pieces, kernels and grid chunks of ``mem`` at ``b`` decode tokens."""
    r, spec = mem.retrieval, mem.retrieval.spec
    x = torch.randn(b, 1, d_model, device=DEV, dtype=mem.out_proj.weight.dtype) * 0.5
    state = mem.new_state(b, x.device, x.dtype) if hasattr(mem, "new_state") else None
    x2 = x.view(b, -1)
    s_row, s_col = r.per_rank_scores(x2)
    tk = r.tucker
    args_t = (s_row.reshape(-1, spec.n_keys, spec.tucker_rank).contiguous(),
              s_col.reshape(-1, spec.n_keys, spec.tucker_rank).contiguous(), tk.cores, tk.u, tk.v)
    scores, addr = r(x2)
    local, rows = mem.pool_rows_for(addr.reshape(b, -1))
    pre_q = skinny_linear(x2, mem.pre_proj.weight)
    sc = scores.reshape(b, -1, scores.shape[-1]).to(mem.pool.values.dtype)
    pooled = lookup_reduce(mem.pool.values, rows, sc, pre_values=mem.pool.pre_values, pre_query=pre_q,
                           activation=mem.cfg.activation)[:, 0]
    pieces = {
        "layer": lambda: mem(x, state),
        "query_proj": lambda: skinny_linear(x2, r.query_proj.weight),
        "scores (proj + norm + key scores)": lambda: r.per_rank_scores(x2),
        "retrieve (scores + top-m)": lambda: r(x2),
        "top-m (3 launches)": lambda: tucker_topk(s_row, s_col, tk.cores, tk.u, tk.v, spec.k, spec.topk),
        "top-m phase 1": lambda: rk.phase1_select(args_t[0], args_t[1], tk.u, tk.v, spec.k, False),
        "ring map": lambda: mem.pool_rows_for(addr.reshape(b, -1)),
        "pre_proj": lambda: skinny_linear(x2, mem.pre_proj.weight),
        "lookup": lambda: lookup_reduce(mem.pool.values, rows, sc, pre_values=mem.pool.pre_values,
                                        pre_query=pre_q, activation=mem.cfg.activation),
        "out_proj": lambda: skinny_linear(pooled, mem.out_proj.weight),
    }
    row = {"batch": b, "pieces_us": {}, "grid_chunk_us": {}, "kernels": []}
    for name, fn in pieces.items():
        row["pieces_us"][name] = round(bench.time_replays(fn, 20, 15) * 1e3, 2)
    row["kernels"] = kernel_table(pieces["layer"])
    row["kernels_retrieve"] = kernel_table(pieces["retrieve (scores + top-m)"])
    old = rk.GRID_CHUNK_FEW, rk.GRID_CHUNK
    for chunk in (256, 512, 1024, 2048, 4096, 16384):
        rk.GRID_CHUNK_FEW = rk.GRID_CHUNK = chunk
        try:
            row["grid_chunk_us"][str(chunk)] = round(bench.time_replays(pieces["top-m (3 launches)"], 20, 15) * 1e3, 2)
        except Exception as err:  # noqa: BLE001
            row["grid_chunk_us"][str(chunk)] = f"{type(err).__name__}: {str(err)[:120]}"
    rk.GRID_CHUNK_FEW, rk.GRID_CHUNK = old
    return row


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--preset", default="ultramem-v2-1b-7b")
    ap.add_argument("--batches", default="1,8,64")
    args = ap.parse_args()
    t0 = time.time()
    if DEV == "cpu":
        import decode_parts
        bench.time_replays = decode_parts.cpu_timer
    cfg = get_preset(args.preset).model
    cfg.dropout = 0.0
    model = bench.build(cfg, DEV, torch.bfloat16 if DEV == "cuda" else torch.float32)
    mem = model.memory[0]
    spec = mem.retrieval.spec
    doc = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)", "command": " ".join(["python3"] + sys.argv),
           "torch": torch.__version__, "preset": args.preset,
           "shape": {"N": spec.n_keys, "K": spec.key_dim, "k": spec.k, "m": spec.topk, "heads": spec.heads,
                     "rank": spec.tucker_rank, "D": cfg.d_model},
           "floor_us": None, "batches": []}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "v2-chain-h200.json")
    tiny = torch.zeros(1, device=DEV)
    doc["floor_us"] = round(bench.time_replays(lambda: tiny.add_(1), 50, 15) * 1e3, 2)
    for b in [int(x) for x in args.batches.split(",")]:
        row = batch_row(mem, cfg.d_model, b)
        doc["batches"].append(row)
        doc["seconds"] = round(time.time() - t0, 1)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
        print(json.dumps(row)[:3000], flush=True)
    print("wrote", path, "in", round(time.time() - t0), "s")


if __name__ == "__main__":
    main()
