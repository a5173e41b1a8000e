"""Training-step time with and without the memory-span overlap (ultramem.distributed.overlap),
on one GPU in a one-rank process group (NCCL), FSDP2 + ``parallelize`` as in a sharded run.

What one GPU can show: the side stream's cost or gain with the lookup's collectives run for
real on one rank (``always_communicate``: all-to-alls / all-gathers of one rank, i.e. the
kernels and host syncs without the wire) next to the plain one-rank lookup. What it cannot: the
overlap of inter-GPU traffic with blocks i+1..j (no multi-GPU machine; docs/distributed.md §4).
Before timing, each overlapped model's first-step loss is checked against its plain twin.

    python benchmarks/distributed_overlap.py                 # H200: ~30 s, writes docs/results/distributed-overlap-h200.json
    python benchmarks/distributed_overlap.py --smoke         # CPU, tiny, a few seconds (no streams: overlap is off)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ultramem.distributed.parallelize import make_mesh, parallelize
from ultramem.model.transformer import Transformer
from ultramem.presets import get_preset


def _step(model, x, y, dtype) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(x, y)
        loss = out.loss + out.aux_loss if out.aux_loss is not None else out.loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return out.loss.detach()


def _time(model, x, y, dtype, steps: int) -> list[float]:
    """ms per forward + backward, one CUDA-event pair per step (wall clock on the CPU)."""
    times = []
    for _ in range(steps):
        if x.is_cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            _step(model, x, y, dtype)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            _step(model, x, y, dtype)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ultramem-151m-x12")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="off/on alternations (drift control)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny-ultramem, 2 steps")
    ap.add_argument("--out", type=Path, default=Path("docs/results/distributed-overlap-h200.json"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.batch, args.seq, args.steps, args.rounds = "tiny-ultramem", 2, 32, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    store = Path(tempfile.mkdtemp()) / "store"
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=0, world_size=1)
    cfg = get_preset(args.preset).model
    spans = [(s.src, s.dst) for s in cfg.wiring().spans]
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device) for _ in range(2))
    rows = []
    t_start = time.perf_counter()
    for lookup in ("one-rank", "row", "col"):
        torch.manual_seed(0)
        base = Transformer.build(cfg, device)
        models = {}
        for overlap in (False, True):
            m = copy.deepcopy(base)
            plan = parallelize(m, make_mesh(1), partition="row" if lookup == "one-rank" else lookup, overlap=overlap)
            for layer in m.memory:
                layer.lookup.always_communicate = lookup != "one-rank"
            models[overlap] = (m, plan.overlapped)
        del base
        torch.manual_seed(1)
        loss_off = _step(models[False][0], x, y, dtype)
        torch.manual_seed(1)
        loss_on = _step(models[True][0], x, y, dtype)
        for m, _ in models.values():  # warm-up (kernels, autotune, allocator)
            _time(m, x, y, dtype, 2)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for overlap in (False, True):
                times[overlap] += _time(models[overlap][0], x, y, dtype, args.steps)
        for overlap in (False, True):
            rows.append({"lookup": lookup, "overlap": overlap, "layers_overlapped": models[overlap][1],
                         "ms_median": statistics.median(times[overlap]), "ms_min": min(times[overlap]),
                         "steps_timed": len(times[overlap])})
        rows[-1]["on_over_off"] = rows[-1]["ms_median"] / rows[-2]["ms_median"]
        rows[-1]["first_loss_diff"] = abs(float(loss_on) - float(loss_off))
        print(f"{lookup:>8}: off {rows[-2]['ms_median']:.2f} ms, on {rows[-1]['ms_median']:.2f} ms "
              f"(x{rows[-1]['on_over_off']:.3f}; first-step loss diff {rows[-1]['first_loss_diff']:.2e})", flush=True)
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.destroy_process_group()
    doc = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "torch": torch.__version__, "preset": args.preset, "spans": spans, "batch": args.batch, "seq": args.seq,
           "dtype": str(dtype), "world": 1, "wall_s": round(time.perf_counter() - t_start, 1),
           "note": "one GPU, one-rank NCCL group: no inter-GPU traffic to hide; row/col run the "
                   "lookup's collectives on one rank (always_communicate)", "rows": rows}
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
