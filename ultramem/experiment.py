"""``ultramem experiment NAME --out DIR``: a set of training runs from one JSON file.

    ultramem experiment diagnosis --out runs/diagnosis data.path=data/code
    ultramem experiment --list

``NAME`` is a file ``experiments/NAME.json`` (repository root or the current directory) or a
path to one::

    {"description": "...",
     "common": ["model.vocab_size=8192", "train.max_steps=450"],     # every run
     "equal": {"params": 0.02, "flops_per_token": 0.02},             # optional check
     "runs": [{"name": "dense", "preset": "dense-151m", "family": "v1", "overrides": [...]}]}

Extra dotted overrides on the command line apply to every run after ``common``. Runs go in
order into ``DIR/runs/<name>``; a finished run (its ``summary.json`` at ``max_steps``) is
skipped, an unfinished one resumes from its checkpoint (:func:`ultramem.train.trainer.train`),
so rerunning the command continues an interrupted experiment. ``DIR/results.json`` is rewritten
after every run (status, sizes from the accounting, validation loss and curve), so an
interrupted experiment keeps what finished. A run that fails is recorded with its error and
the next one starts; SIGINT/SIGTERM stop the experiment after the current run saves.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ultramem.accounting import count
from ultramem.config import Config
from ultramem.errors import ConfigError
from ultramem.resolve import load_config

ROOTS = tuple(dict.fromkeys((Path.cwd() / "experiments", Path(__file__).resolve().parents[1] / "experiments")))


def find_experiment(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".json" and p.exists():
        return p
    for root in ROOTS:
        if (root / f"{name}.json").exists():
            return root / f"{name}.json"
    known = sorted({q.stem for r in ROOTS if r.is_dir() for q in r.glob("*.json")})
    raise ConfigError(f"experiment {name!r} not found in experiments/; known: {', '.join(known) or 'none'}")


def load_experiment(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    runs = spec.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{path}: 'runs' must be a non-empty list of {{name, preset, overrides}}")
    names = [r.get("name") for r in runs]
    if None in names or len(set(names)) != len(names):
        raise ConfigError(f"{path}: every run needs a unique 'name' (got {names})")
    return spec


def run_configs(spec: dict[str, Any], extra: list[str]) -> list[tuple[dict[str, Any], Config]]:
    """Each run's resolved config: preset < ``common`` < the run's overrides < ``extra``."""
    out = []
    for r in spec["runs"]:
        items = list(spec.get("common", [])) + list(r.get("overrides", [])) + list(extra)
        try:
            out.append((r, load_config(preset=r.get("preset"), overrides=items)))
        except ConfigError as e:
            raise ConfigError(f"run {r['name']!r}: {e}") from None
    return out


def check_equal(spec: dict[str, Any], runs: list[tuple[dict[str, Any], Config]]) -> dict[str, dict[str, int]]:
    """Sizes of every run from the accounting; with ``equal``, each figure within its relative
    tolerance of the first run's (runs marked ``"reference": false`` are exempt)."""
    sizes = {}
    for r, cfg in runs:
        c = count(cfg.model)
        sizes[r["name"]] = {"params": c.params, "active_params": c.active_params, "flops_per_token": c.flops_per_token}
    for key, tol in spec.get("equal", {}).items():
        checked = [r["name"] for r, _ in runs if r.get("reference", True)]
        ref = sizes[checked[0]][key]
        bad = [f"{n}: {sizes[n][key]:,} ({sizes[n][key] / ref - 1:+.1%})" for n in checked
               if abs(sizes[n][key] / ref - 1) > tol]
        if bad:
            raise ConfigError(f"experiment runs differ in {key} by more than {tol:.0%} from "
                              f"{checked[0]} ({ref:,}): " + "; ".join(bad))
    return sizes


def _finished(run_dir: Path) -> dict[str, Any] | None:
    p = run_dir / "summary.json"
    if not p.exists():
        return None
    s = json.loads(p.read_text())
    return s if s.get("step") == s.get("max_steps") and not s.get("interrupted") else None


def _val_curve(run_dir: Path) -> dict[int, float]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return {}
    rows = (json.loads(line) for line in p.read_text().splitlines() if line.strip())
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def run_experiment(name: str, out: str | Path, extra: list[str] = (), only: list[str] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    from ultramem.train.trainer import train  # noqa: PLC0415 (torch-heavy; --list stays fast)

    path = find_experiment(name)
    spec = load_experiment(path)
    runs = run_configs(spec, list(extra))
    sizes = check_equal(spec, runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "experiment": path.stem, "description": spec.get("description", ""),
        "command": "ultramem experiment " + " ".join([path.stem, "--out", str(out), *extra]),
        "device": None, "runs": [],
    }
    rows = {r["name"]: {"name": r["name"], "preset": r.get("preset"), "family": r.get("family", ""),
                        "status": "pending", **sizes[r["name"]]} for r, _ in runs}

    def write() -> None:
        results["runs"] = list(rows.values())
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(out / "results.json")

    for r, cfg in runs:
        if only and r["name"] not in only:
            continue
        run_dir = out / "runs" / r["name"]
        row = rows[r["name"]]
        summary = _finished(run_dir)
        if summary is None:
            row["status"] = "running"
            write()
            t0 = time.perf_counter()
            try:
                summary = train(cfg, run_dir, progress=progress)
            except Exception as e:  # noqa: BLE001 -- record it, keep the other runs
                row.update(status=f"failed: {type(e).__name__}: {e}", val_curve=_val_curve(run_dir))
                write()
                continue
            row["wall_s"] = time.perf_counter() - t0
        row.update(status="interrupted" if summary.get("interrupted") else "done",
                   tokens=summary.get("tokens_seen"), val_loss=summary.get("val_loss"),
                   val_bpb=summary.get("val_bpb"), tokens_per_s=summary.get("tokens_per_s"),
                   val_curve=_val_curve(run_dir))
        results["device"] = summary.get("device")
        write()
        if summary.get("interrupted"):
            break
    write()
    return results


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="run an experiment from experiments/NAME.json (resumable)")
    p.add_argument("name", nargs="?", help="experiment name (experiments/NAME.json) or a .json path")
    p.add_argument("--out", help="experiment directory (runs/ and results.json)")
    p.add_argument("--only", nargs="*", default=None, help="run only these runs (by name)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. data.path=data/code")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        for root in ROOTS:
            for q in sorted(root.glob("*.json")) if root.is_dir() else []:
                print(f"{q.stem:28s} {json.loads(q.read_text()).get('description', '')}")
        return 0
    if not args.name or not args.out:
        raise ConfigError("ultramem experiment needs NAME and --out DIR (or --list)")
    res = run_experiment(args.name, args.out, args.overrides, args.only, progress=not args.no_progress)
    for row in res["runs"]:
        loss = f"{row['val_loss']:.4f}" if row.get("val_loss") is not None else "-"
        print(f"{row['name']:24s} {row['status']:12s} val {loss}", file=sys.stdout)
    return 0 if all(r["status"] in ("done", "pending") for r in res["runs"]) else 1
