"""``ultramem train``: train a preset (or config file) with dotted overrides.

    ultramem train --preset tiny-dense --out runs/tiny-dense train.max_steps=200
    ultramem train --config runs/x/config.json --out runs/x          # resume (same config)
    torchrun --nproc_per_node 2 -m ultramem.cli train --preset tiny-dense --out runs/ddp

Resumes from ``OUT``'s latest checkpoint; a changed config or a changed dataset is refused
(with the differences) unless ``--force``; ``--restart`` moves the previous run to
``OUT.prev-<time>/`` and starts afresh. One process per ``OUT`` (a lock file). SIGINT/SIGTERM
save a checkpoint and exit with status 130/143; a diverged run stops with status 2.
"""

from __future__ import annotations

import argparse
import json
import os

from ultramem.cli_args import positive_int
from ultramem.config import load_config
from ultramem.train.trainer import train


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (resumes from OUT's latest checkpoint)")
    p.add_argument("--preset", help="preset name (ultramem info --list)")
    p.add_argument("--config", help="JSON config file (e.g. a run's config.json)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--force", action="store_true", help="resume even if the config changed")
    p.add_argument("--restart", action="store_true",
                   help="start afresh: move OUT's previous run to OUT.prev-<time>/ first")
    p.add_argument("--stop-after", type=positive_int, default=None, help="save and stop after N steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(preset=args.preset, config_file=args.config, overrides=args.overrides)
    summary = train(cfg, args.out, resume=not args.restart, force=args.force,
                    stop_after=args.stop_after, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: summary[k] for k in ("run", "step", "val_loss", "val_bpb", "tokens_per_s") if k in summary}))
    if summary["interrupted"] and summary["signal"] is not None:
        return 128 + int(summary["signal"])
    return 0
