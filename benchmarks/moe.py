"""MoE benchmark, one process on one GPU: our MoE layer against Hugging Face transformers'
OlmoeSparseMoeBlock at the same sizes (training step: fwd + bwd of the block; decode step: a
few tokens through the block, CUDA-graph replay), the whole-model decode step of
moe-1.6b-2in34 against dense-1.6b, the routing kernels eager vs torch.compile, a sync check
over a training step, and the whole-model training table (``train_throughput.py``).

    PYTHONPATH=. python3 benchmarks/moe.py --out $OUT        # -> $OUT/moe-<device>.json
    python3 benchmarks/moe.py --plot docs/results/moe-h200.json  # -> the PNG beside it

transformers' experts are gated (gate_up_proj): for our GELU presets its inner width is 2/3 of
ours so that both have the same parameters and FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from ultramem.inference.bench import time_eager  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16
ROWS: list[dict] = []
# preset -> (d_model, MoEConfig preset name), the four layer sizes of issue 11
LAYER_PRESETS = ("moe-151m-2in32", "moe-1.6b-2in34", "olmoe-227m-1.2b", "olmoe-1b-7b")
TRAIN_PRESETS = ("dense-151m", "moe-151m-2in32", "olmoe-227m-1.2b", "dense-227m-swiglu3072",
                 "hf-olmoe-227m-1.2b", "pkm-151m-x12", "ultramem-151m-x12", "ultramem-v2-227m-1.2b")
DECODE_BATCHES = (1, 8, 64)


def rec(**row) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def _events(fn, warmup: int = 2, reps: int = 10) -> float:
    return time_eager(fn, calls=1, reps=reps, warmup=warmup)


def _graph_or_eager(fn) -> tuple[float, bool]:
    """Graph-replay ms of ``fn`` where it captures, else eager ms."""
    from _bench import graph_time  # noqa: PLC0415

    try:
        return graph_time(fn, calls=5, reps=10), True
    except Exception as err:  # a host sync inside fn: not capturable
        print(f"  capture failed ({type(err).__name__}: {str(err)[:120]}); timing eagerly", flush=True)
        torch.cuda.synchronize()
        return _events(fn), False


# ---- the layers ------------------------------------------------------------------------------
def ours(name: str):
    from ultramem.presets import get_preset  # noqa: PLC0415

    cfg = get_preset(name).model
    layer = cfg.ffn.build(cfg.wiring().ffn[0]).to(DEV)  # block 1's FFN shape
    layer.init_weights()
    return layer, cfg


def hf_block(name: str, impl: str):
    from transformers import OlmoeConfig  # noqa: PLC0415
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock  # noqa: PLC0415

    from ultramem.presets import get_preset  # noqa: PLC0415

    cfg = get_preset(name).model
    moe = cfg.ffn
    gated = moe.activation == "swiglu"
    inner = moe.hidden if gated else int(round(moe.hidden * 2 / 3 / 16)) * 16
    hc = OlmoeConfig(hidden_size=cfg.d_model, intermediate_size=inner, num_experts=moe.n_experts,
                     num_experts_per_tok=moe.top_k, norm_topk_prob=moe.normalize_top_k,
                     hidden_act="silu" if gated else "gelu", experts_implementation=impl)
    block = OlmoeSparseMoeBlock(hc).to(DEV)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return block


def layer_train(name: str, batch: int = 8, seq: int = 2048) -> dict:
    """fwd + bwd of one block on [8, 2048, D] under bf16 autocast, fp32 weights; ours with both
    layouts of the bf16 weight copy. Returns ``{layout: ms}``."""
    layer, cfg = ours(name)
    x = torch.randn(batch, seq, cfg.d_model, device=DEV, requires_grad=True)

    def step(mod, aux: bool):
        def run():
            with torch.autocast(DEV, BF16):
                y = mod(x)
                loss = y.float().square().mean()
                if aux:
                    loss = loss + sum(mod.pop_aux()[0].values())
            loss.backward()
        return run

    path = layer.path_for(batch * seq, x.device, BF16)
    by_layout = {}
    for layout in ("row", "col"):
        layer.cfg.grouped_layout = layout
        by_layout[layout] = ms = _events(step(layer, True))
        rec(bench="train", impl="ultramem", preset=name, batch=batch, seq=seq, ms=ms,
            tokens_per_s=batch * seq / ms * 1e3, graph=False, path=path, variant=f"grouped_layout={layout}")
    layer = None
    try:
        block = hf_block(name, "grouped_mm")  # its fastest backend (eager: slower at every size, first run)
        ms = _events(step(block, False))
        rec(bench="train", impl="transformers", preset=name, batch=batch, seq=seq, ms=ms,
            tokens_per_s=batch * seq / ms * 1e3, graph=False, variant="experts_implementation=grouped_mm")
    except Exception as err:
        print(f"  hf train failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
    block = None
    torch.cuda.empty_cache()
    return by_layout


def profile_layer(name: str, layout: str) -> None:
    """The CUDA kernels of one fwd + bwd of the block, by total time (what limits it)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    layer, cfg = ours(name)
    layer.cfg.grouped_layout = layout
    x = torch.randn(8, 2048, cfg.d_model, device=DEV, requires_grad=True)

    def run():
        with torch.autocast(DEV, BF16):
            loss = layer(x).float().square().mean() + sum(layer.pop_aux()[0].values())
        loss.backward()

    for _ in range(2):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / 3 / 1e3
    top = [{"kernel": e.key[:90], "ms": e.device_time_total / 3 / 1e3, "calls": e.count // 3} for e in events[:14]]
    rec(bench="profile", impl="ultramem", preset=name, batch=8, seq=2048, ms=total, layout=layout, kernels=top)


def layer_decode(name: str) -> None:
    """``batch`` tokens through the block, weights in bf16, no grad, CUDA-graph replay."""
    layer, cfg = ours(name)
    layer = layer.to(BF16).eval()
    for batch in DECODE_BATCHES:
        x = torch.randn(batch, 1, cfg.d_model, device=DEV, dtype=BF16)
        auto = layer.path_for(batch, x.device, BF16)
        for impl in ("gather", "grouped_mm"):
            layer.cfg.impl = impl
            with torch.no_grad():
                ms, graph = _graph_or_eager(lambda x=x: layer(x))
            rec(bench="decode", impl="ultramem", preset=name, batch=batch, seq=1, ms=ms,
                tokens_per_s=batch / ms * 1e3, graph=graph, path=layer.path_for(batch, x.device, BF16),
                auto_path=auto)
        layer.cfg.impl = "auto"
    layer = None
    # transformers documents grouped_mm as not CUDA-graph safe: timed eagerly, never captured
    # (a failed capture can leave the context unusable for the rows after it)
    for impl in ("batched_mm", "grouped_mm"):
        try:
            block = hf_block(name, impl).to(BF16).eval()
        except Exception as err:
            print(f"  hf {impl} failed: {err}", flush=True)
            continue
        for batch in DECODE_BATCHES:
            x = torch.randn(batch, 1, cfg.d_model, device=DEV, dtype=BF16)
            with torch.no_grad():
                if impl == "grouped_mm":
                    ms, graph = _events(lambda x=x, b=block: b(x)), False
                else:
                    ms, graph = _graph_or_eager(lambda x=x, b=block: b(x))
            rec(bench="decode", impl="transformers", preset=name, batch=batch, seq=1, ms=ms,
                tokens_per_s=batch / ms * 1e3, graph=graph, variant=f"experts_implementation={impl}")
        block = None
        torch.cuda.empty_cache()


# ---- the whole-model decode step -------------------------------------------------------------
def model_decode(copy_gbps: float) -> None:
    """One-token forward of the whole model at batch B (no KV cache: the attention reads only
    the token itself, the same for both models), bf16 weights, CUDA-graph replay."""
    from ultramem.model.transformer import Transformer  # noqa: PLC0415
    from ultramem.presets import get_preset  # noqa: PLC0415

    dense_ms = {}
    for name in ("dense-1.6b", "moe-1.6b-2in34"):
        cfg = get_preset(name).model
        cfg.dropout = 0.0
        torch.set_default_dtype(BF16)  # build the 21 B-parameter model in bf16 directly
        try:
            model = Transformer.build(cfg, device=DEV).eval()
        finally:
            torch.set_default_dtype(torch.float32)
        moe = cfg.ffn if name.startswith("moe") else None
        for batch in DECODE_BATCHES:
            idx = torch.randint(0, cfg.vocab_size, (batch, 1), device=DEV)
            for impl in (("auto", "grouped_mm") if moe else ("dense",)):
                if moe:
                    moe.impl = impl
                with torch.no_grad():
                    ms, graph = _graph_or_eager(lambda i=idx, m=model: m(i))
                row = dict(bench="decode_model", impl="ultramem", preset=name, batch=batch, seq=1, ms=ms,
                           tokens_per_s=batch / ms * 1e3, graph=graph)
                if moe:
                    path = model.blocks[0].ffn.path_for(batch, idx.device, BF16)
                    # bytes the selected experts must read: distinct experts of the batch, at
                    # most min(E, B*k) per block (batch 1: exactly k)
                    n_sel = min(moe.n_experts, batch * moe.top_k)
                    sel = cfg.n_layers * n_sel * 2 * cfg.d_model * moe.hidden * 2
                    bound = sel / copy_gbps / 1e6 + dense_ms[batch]
                    row.update(path=path, expert_bytes=sel, bound_ms=bound, vs_bound=ms / bound)
                else:
                    dense_ms[batch] = ms
                rec(**row)
            if moe:
                moe.impl = "auto"
        model = None
        torch.cuda.empty_cache()


# ---- routing: eager vs torch.compile ---------------------------------------------------------
def routing(tokens: int = 16384) -> None:
    from ultramem.layers.moe import dispatch, route, switch_balance_loss  # noqa: PLC0415

    for e, k in ((64, 8),):
        logits = torch.randn(tokens, e, device=DEV, dtype=BF16)

        def fn(logits=logits, e=e, k=k):
            probs, gates, experts = route(logits, k, False)
            return switch_balance_loss(probs, experts, e), gates, dispatch(experts, e)

        ms_eager = _events(fn, reps=20)
        t0 = time.time()
        compiled = torch.compile(fn)
        ms_comp = _events(compiled, reps=20)
        rec(bench="routing", impl="ultramem", preset=f"E{e}-k{k}", batch=tokens, seq=1, ms=ms_eager,
            tokens_per_s=tokens / ms_eager * 1e3, graph=False, compiled_ms=ms_comp,
            compile_s=time.time() - t0)


def sync_check() -> None:
    """A whole moe-151m-2in32 training step under ``set_sync_debug_mode("error")``."""
    from train_throughput import train_step_fn  # noqa: PLC0415

    from ultramem.model.transformer import Transformer  # noqa: PLC0415
    from ultramem.presets import get_preset  # noqa: PLC0415

    model = Transformer.build(get_preset("moe-151m-2in32").model, device=DEV).train()
    step = train_step_fn(model, hf=False)
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        ok, msg = True, "passed"
    except RuntimeError as err:
        ok, msg = False, str(err)[:300]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    rec(bench="sync_check", impl="ultramem", preset="moe-151m-2in32", batch=8, seq=2048, ok=ok, message=msg)


def run(out: str, budget_s: float) -> None:
    import train_throughput as tt  # noqa: PLC0415
    from _bench import copy_gbps, do_bench, warm_up  # noqa: PLC0415

    t0 = time.time()
    device = torch.cuda.get_device_name()
    slug = "h200" if "H200" in device else device.split()[-1].lower()
    path = os.path.join(out, f"moe-{slug}.json")
    import transformers  # noqa: PLC0415

    meta = {"device": device, "command": "PYTHONPATH=. python3 benchmarks/moe.py --out $OUT",
            "torch": torch.__version__, "transformers": transformers.__version__}

    def save() -> None:
        with open(path, "w") as f:
            json.dump({**meta, "elapsed_s": time.time() - t0, "rows": ROWS}, f, indent=1)

    warm_up(2.0)
    gbps = copy_gbps(DEV, BF16, do_bench)
    meta["copy_gbps"] = gbps
    layouts: dict[str, float] = {"row": 0.0, "col": 0.0}

    def train_layers() -> None:
        for n in LAYER_PRESETS:
            for k, v in layer_train(n).items():
                layouts[k] += v
        best = min(layouts, key=layouts.get)
        tt.MOE_OVERRIDES["grouped_layout"] = best  # every later MoE row uses the faster layout
        meta["grouped_layout"] = {"chosen": best, "sum_ms_over_layer_presets": layouts}

    sections = [("sync", sync_check), ("layer train", train_layers),
                ("profile", lambda: profile_layer("moe-151m-2in32", tt.MOE_OVERRIDES.get("grouped_layout", "row"))),
                ("model train", lambda: ROWS.extend(tt.train_rows(list(TRAIN_PRESETS[:5]), 2, 5))),
                ("model decode", lambda: model_decode(gbps))]
    sections += [(f"decode {n}", lambda n=n: layer_decode(n)) for n in LAYER_PRESETS]
    sections += [("model train (memory layers)",
                  lambda: ROWS.extend(tt.train_rows(list(TRAIN_PRESETS[5:]), 2, 5, deadline=t0 + budget_s))),
                 ("routing", routing)]
    for label, fn in sections:
        if time.time() - t0 > budget_s:
            print(f"{label}: skipped (budget)", flush=True)
            continue
        print(f"== {label} ({time.time() - t0:.0f} s)", flush=True)
        try:
            fn()
        except Exception as err:
            print(f"{label}: FAILED {type(err).__name__}: {err}", flush=True)
            ROWS.append({"bench": label, "error": f"{type(err).__name__}: {err}"[:300]})
        torch.cuda.empty_cache()
        save()
    print(f"wrote {path} ({time.time() - t0:.0f} s)")


def plot(path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    data = json.load(open(path))
    rows = [r for r in data["rows"] if "ms" in r]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    model = [r for r in rows if r["bench"] == "train_model"]
    ax = axes[0]
    ax.barh([r["preset"] for r in model], [r["tokens_per_s"] / 1e3 for r in model],
            color=["tab:orange" if r["impl"] == "transformers" else "tab:blue" for r in model])
    ax.set_xlabel("K tokens/s (fwd+bwd+AdamW, 8x2048, bf16)")
    ax.set_title("whole-model training")
    for i, (bench, title) in enumerate((("train", "MoE block fwd+bwd, 8x2048 tokens"),
                                        ("decode", "MoE block decode, batch 1 (graph)"))):
        ax = axes[i + 1]
        sel = [r for r in rows if r["bench"] == bench and (bench == "train" or r["batch"] == 1)]
        labels, vals, colors = [], [], []
        for r in sel:
            tag = r.get("variant", r.get("path", "")).replace("experts_implementation=", "")
            labels.append(f"{r['preset']} {r['impl'][:2]} {tag}")
            vals.append(r["ms"])
            colors.append("tab:orange" if r["impl"] == "transformers" else "tab:blue")
        ax.barh(labels, vals, color=colors)
        ax.set_xscale("log")
        ax.set_xlabel("ms (log)")
        ax.set_title(title)
    fig.suptitle(f"MoE on {data['device']} (blue: ultramem, orange: transformers {data.get('transformers', '')})")
    fig.tight_layout()
    fig.savefig(path.replace(".json", ".png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=170.0, help="skip sections started after this")
    ap.add_argument("--plot", help="a results JSON to draw")
    args = ap.parse_args()
    if args.plot:
        plot(args.plot)
    else:
        run(args.out, args.budget_s)


if __name__ == "__main__":
    main()
