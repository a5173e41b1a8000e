"""``ultramem bench decode``: the time of one decode step (CUDA graph replay) and the bytes it
must read, per model and batch size.

    ultramem bench decode --preset dense-1.6b ultramem-1.6b-x12 --batch 1 8 64 --kv 2048

A step is the engine's: every block (attention over ``kv`` cached positions), the memory layers,
the final norm, the LM head and greedy sampling, captured as one CUDA graph (20 steps per graph
replay, median of many replays after warm-up; CUDA events). Weights are random, bf16.

Bytes are analytic (:func:`step_bytes`): every weight that a step must touch, the KV cache it
reads, and for row-gathered tables (MoE experts, memory values) only the expected number of
distinct rows that ``B`` tokens select under uniform routing, ``N (1 - (1 - 1/N)^picks)``.
``GBps`` is bytes / time; compare it with ``copy_gbps`` (read + write bytes of a 1 GiB copy).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from ultramem.errors import ConfigError
from ultramem.inference.engine import Engine
from ultramem.inference.sampling import Sampling
from ultramem.layers.memory_plus import MemoryPlus
from ultramem.layers.moe import MoE
from ultramem.layers.pkm import PKM
from ultramem.layers.ultramem import UltraMem
from ultramem.layers.ultramem_v2 import UltraMemV2
from ultramem.model.decode_state import ATTENTION
from ultramem.model.transformer import Transformer
from ultramem.presets import get_preset

# Row-gathered tables of each layer type: (parameter, rows in play, rows each token selects).
# A type absent here reads all its weights every step.
GatherRule = Callable[[nn.Module], list[tuple[torch.Tensor | None, int, int]]]
GATHERED: dict[type, GatherRule] = {
    MoE: lambda m: [(p, m.cfg.n_experts, m.cfg.top_k) for p in (m.w_up, m.w_gate, m.w_down)],
    PKM: lambda m: [(m.values, m.values.shape[0], m.cfg.heads * m.cfg.topk)],
    MemoryPlus: lambda m: [(m.shared.values, m.shared.values.shape[0], m.cfg.heads * m.cfg.topk)],
    UltraMem: lambda m: [(m.values, m.values.shape[0], m.cfg.heads * m.cfg.topk)],
    UltraMemV2: lambda m: [(m.pool.values, m.window, m.cfg.heads * m.cfg.topk),
                           (m.pool.pre_values, m.window, m.cfg.heads * m.cfg.topk)],
}


def distinct(rows: int, picks: float) -> float:
    """Expected distinct rows among ``picks`` uniform draws from ``rows``."""
    return rows * (1.0 - (1.0 - 1.0 / rows) ** picks)


def step_bytes(model: Transformer, batch: int, kv: int, elem: int = 2) -> int:
    """Bytes one decode step of ``batch`` tokens must read (weights in ``elem``-byte elements)."""
    cfg = model.cfg
    gathered: dict[int, float] = {}  # param id -> bytes read
    for layer in model.modules():
        rule = GATHERED.get(type(layer))
        for p, rows, per_token in rule(layer) if rule else []:
            if p is not None:
                row_bytes = p.numel() // p.shape[0] * elem
                gathered[id(p)] = gathered.get(id(p), 0.0) + distinct(rows, per_token * batch) * row_bytes
    emb = model.embed_tokens.weight
    total = sum(gathered.values()) + batch * cfg.d_model * elem  # embedding rows of the batch
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or id(p) in gathered:
            continue
        seen.add(id(p))
        if p is emb and model.lm_head is not None:
            continue  # untied: the input embedding is only gathered (counted above)
        total += p.numel() * elem  # tied embedding = LM head, read in full
    total += len(model.blocks) * 2 * batch * kv * cfg.kv_heads * cfg.head_dim * elem
    return int(total)


def build(cfg_model, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> Transformer:
    """Random-weight model in ``dtype`` (initialised in fp32, then cast)."""
    return Transformer.build(cfg_model, device).to(dtype).eval()


def time_replays(fn: Callable[[], None], calls: int = 20, reps: int = 15) -> float:
    """Median ms per ``fn`` of a CUDA graph of ``calls`` calls (warmed on its capture stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    ms = _median_event_ms(graph.replay, reps, calls)
    del graph
    return ms


def time_eager(fn: Callable[[], None], calls: int = 1, reps: int = 15, warmup: int = 3) -> float:
    """Median ms per ``fn``, eager: CUDA events around ``calls`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()

    def run() -> None:
        for _ in range(calls):
            fn()

    return _median_event_ms(run, reps, calls)


def _median_event_ms(run: Callable[[], None], reps: int, per: int) -> float:
    """Median over ``reps`` of CUDA-event ms around ``run()``, divided by the ``per`` calls it makes."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def decode_step_ms(model: Transformer, batch: int, kv: int, overlap: bool = False, graphs: bool = True,
                   calls: int = 20, reps: int = 15, compile: bool | dict = False, attention: str = "auto") -> float:
    """Median ms of one greedy decode step at ``batch`` sequences with ``kv`` cached positions.

    The step (the engine's, attention over all ``kv`` positions) is preceded in the graph by
    one tiny kernel that resets the positions to ``kv - 1``, so every replay does the same
    work. ``graphs=False``: eager steps, timed with CUDA events around ``calls`` steps.
    ``compile``: the step's forward through ``torch.compile`` first; ``attention``: how the step
    reads the cache (:class:`Engine`)."""
    engine = Engine(model, batch, kv, Sampling(0.0), graphs=False, overlap=overlap, compile=compile,
                    attention=attention)
    bk = engine.bucket(batch)
    bk.state.kv_len = kv
    bk.tokens.random_(0, model.cfg.vocab_size)

    def step() -> None:
        bk.state.pos.fill_(kv - 1)
        engine._step(bk)

    if graphs:
        return time_replays(step, calls, reps)
    return time_eager(step, calls, reps)


def copy_gbps(numel: int = 1 << 29) -> float:
    """Read + write bytes of a 1 GiB bf16 device copy over its median time (graph of 20)."""
    x = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = time_replays(lambda: y.copy_(x), calls=10, reps=15)
    return 2 * x.nbytes / ms / 1e6


def row(model_name: str, family: str, model: Transformer, batch: int, kv: int, ms: float, **extra) -> dict:
    b = step_bytes(model, batch, kv)
    return {"model": model_name, "family": family, "batch": batch, "kv": kv, "ms": round(ms, 4),
            "tokens_per_s": round(batch / ms * 1e3, 1), "bytes": b, "GBps": round(b / ms / 1e6, 1), **extra}


# ---- CLI -------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (GPU): 'bench decode' times one decode step")
    bsub = p.add_subparsers(dest="bench", required=True)
    d = bsub.add_parser("decode", help="decode step time and bytes per model and batch (CUDA graph, bf16)")
    d.add_argument("--preset", nargs="+", required=True, help="presets to time")
    d.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64], help="batch sizes")
    d.add_argument("--kv", type=int, default=2048, help="cached positions attention reads")
    d.add_argument("--overlap", action="store_true", help="memory layers on a side stream")
    d.add_argument("--eager", action="store_true", help="no CUDA graph")
    d.add_argument("--attention", default="auto", choices=ATTENTION,
                   help="how decode steps read the KV cache (auto: split-KV kernels at small batches, "
                        "rope_sdpa above)")
    d.add_argument("--out", default=None, help="write the rows as JSON here")
    d.set_defaults(func=run_decode)


def run_decode(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("ultramem bench decode: error: needs a CUDA device (the step is timed as a CUDA graph)",
              file=sys.stderr)
        return 2
    if any(b <= 0 for b in args.batch) or args.kv <= 0:
        raise ConfigError(f"--batch {args.batch} --kv {args.kv}: all must be positive integers")
    rows, t0 = [], time.time()
    for name in args.preset:
        cfg = get_preset(name).model
        if args.kv > cfg.max_seq_len:
            raise ConfigError(f"--kv={args.kv} exceeds {name}'s max_seq_len={cfg.max_seq_len}")
        model = build(cfg)
        for b in args.batch:
            ms = decode_step_ms(model, b, args.kv, overlap=args.overlap, graphs=not args.eager,
                                attention=args.attention)
            rows.append(row(name, "", model, b, args.kv, ms, overlap=args.overlap, attention=args.attention))
            r = rows[-1]
            print(f"{name:<24} B={b:<5} {r['ms']:8.3f} ms {r['tokens_per_s']:>10.0f} tok/s "
                  f"{r['bytes'] / 1e9:7.2f} GB {r['GBps']:7.0f} GB/s", flush=True)
        del model
        torch.cuda.empty_cache()
    out = {"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv),
           "copy_GBps": round(copy_gbps(), 1), "rows": rows, "seconds": round(time.time() - t0, 1)}
    print(f"copy bandwidth (read + write) {out['copy_GBps']:.0f} GB/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0
