"""``ultramem plot``: overlay the loss curves of several runs.

    ultramem plot runs/demo/tiny-dense runs/demo/tiny-ultramem --out runs/demo/compare.png
"""

from __future__ import annotations

import argparse

from ultramem.train.metrics import plot_runs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="overlay loss curves of runs into a PNG")
    p.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--labels", nargs="*", default=None, help="legend labels (default: directory names)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(f"wrote {plot_runs(args.runs, args.out, args.labels)}")
    return 0
