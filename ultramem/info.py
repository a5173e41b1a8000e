"""``ultramem info``: parameters, active parameters and FLOPs per token of a preset.

    ultramem info --list
    ultramem info --preset dense-151m [--json] [model.d_model=512 ...]
"""

from __future__ import annotations

import argparse
import json

from ultramem.accounting import count, embedding_params
from ultramem.presets import get_preset_info, preset_names
from ultramem.resolve import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="sizes and FLOPs of a preset (no weights are built)")
    p.add_argument("--preset", help="preset name (see --list)")
    p.add_argument("--list", action="store_true", help="list presets")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--table", action="store_true", help="markdown table of every preset vs published figures")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.d_model=512")
    p.set_defaults(func=run)


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))


def _rel(value: float, ref: float | None) -> str:
    return "" if ref is None else f"{100 * (value / ref - 1):+.1f} %"


def preset_table() -> str:
    """Markdown: every preset's computed sizes beside the published ones (math.md §6)."""
    head = ("| preset | params | active | GFLOPs/token | published params | Δ | published GFLOPs | Δ | note |\n"
            "|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for name in preset_names():
        info = get_preset_info(name)
        model, pub = info.make().model, info.published
        c, emb = count(model), embedding_params(model)
        params = c.params + (emb if pub.embedding_in_params else 0)
        rows.append(
            f"| `{name}` | {_fmt(c.params)} | {_fmt(c.active_params)} | {c.flops_per_token / 1e9:.4f} | "
            f"{_fmt(pub.params) if pub.params else ''} | {_rel(params, pub.params)} | "
            f"{pub.gflops if pub.gflops else ''} | {_rel(c.flops_per_token / 1e9, pub.gflops)} | {pub.convention} |"
        )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    if args.table:
        print(preset_table())
        return 0
    if args.list or not args.preset:
        names = preset_names()
        if args.json:
            print(json.dumps(names))
            return 0
        width = max(len(n) for n in names)
        for name in names:
            print(f"{name:<{width}}  {get_preset_info(name).description}")
        return 0
    cfg = load_config(preset=args.preset, overrides=args.overrides)
    c = count(cfg.model)
    if args.json:
        print(json.dumps({"preset": args.preset, **c.as_dict()}))
        return 0
    info = get_preset_info(args.preset)
    rows = [
        ("preset", args.preset),
        ("description", info.description),
        ("params (no embeddings)", _fmt(c.params)),
        ("active params", _fmt(c.active_params)),
        ("GFLOPs / token", f"{c.flops_per_token / 1e9:.4f}"),
        ("embedding params", _fmt(embedding_params(cfg.model))),
    ]
    pub = info.published
    if pub.params is not None:
        rows.append(("published params", f"{_fmt(pub.params)} ({100 * (c.params / pub.params - 1):+.2f} %)"))
    if pub.gflops is not None:
        rows.append(("published GFLOPs", f"{pub.gflops} ({100 * (c.flops_per_token / 1e9 / pub.gflops - 1):+.2f} %)"))
    if pub.source:
        rows.append(("source", pub.source))
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
