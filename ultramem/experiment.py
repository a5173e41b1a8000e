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

``--jobs N`` trains up to N runs at once, each in its own process (``--worker``; its log in
``DIR/runs/<name>.log``), which is how small models fill one GPU; the parent writes
``results.json`` as each one ends. An optional ``"after"`` block evaluates each finished run::

    "after": {"english": true, "english_batches": null,        # loss on the bundled English slice
              "probes": {"people": 360, "n": 400, "seed": 0},  # ultramem.eval.probes.run_probes
              "val_full": true,                                # every validation token (below)
              "keep_checkpoints": false}                       # delete a finished run's checkpoints

``val_full`` scores the whole validation split (the training curve's ``train.eval_batches``
read only its first windows, i.e. the first documents): ``val_loss_full``, the loss by
position in the window (``val_loss_by_position``, log-spaced bins) and by document (the
split's documents in stream order, split at ``<|endoftext|>``); the per-token losses are kept
in ``val_token_losses.npy`` (float16, stream order) for analyses across runs.

Its figures go to ``DIR/runs/<name>/after.json`` and into the run's row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ultramem.accounting import count
from ultramem.config import Config
from ultramem.data.index import load_index
from ultramem.data.loader import TokenBatches, split_tokens
from ultramem.data.tokenizer import default_tokenizer_path
from ultramem.errors import ConfigError
from ultramem.eval.cli import evaluate_run
from ultramem.eval.loss import autocast_ctx, token_losses
from ultramem.eval.probes import run_probes
from ultramem.inference.load import load_run
from ultramem.resolve import load_config
from ultramem.train.trainer import train

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


def run_after(run_dir: Path, after: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The spec's ``after`` evaluations of one trained run (``after.json``, reused when it was
    made at the same step)."""
    path = run_dir / "after.json"
    if not after:
        return {}
    if (prev := _read(path)) is not None and prev.get("step") == summary.get("step"):
        return prev
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {"step": summary.get("step")}
    if after.get("english"):
        english = default_tokenizer_path().parent / "corpus_slice.txt"
        out["val_loss_english"] = evaluate_run(str(run_dir), str(english), split="train", device=str(dev),
                                               max_batches=after.get("english_batches"))["loss"]
    if after.get("val_full"):
        out.update(full_validation(run_dir, dev))
    if after.get("probes"):
        pr = after["probes"]
        loaded = load_run(run_dir, dev)
        with autocast_ctx(dev, loaded.cfg.train.dtype):
            out["probes"] = run_probes(loaded.model, loaded.tokenizer, pr["people"], pr["n"], pr.get("seed", 0), dev,
                                       loaded.cfg.model.max_seq_len)
        out["probes"]["knowledge_recall"]["bits_per_param"] = (
            out["probes"]["knowledge_recall"]["bits"] / count(loaded.cfg.model).params)
        del loaded
    path.write_text(json.dumps(out, indent=1) + "\n")
    if not after.get("keep_checkpoints", True) and not summary.get("interrupted"):
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return out


POSITION_BINS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # window positions [b_i, b_i+1), last: to the end


def full_validation(run_dir: Path, dev: torch.device) -> dict[str, Any]:
    """Loss of the trained run on every validation token (see the module docstring); writes
    ``run_dir/val_token_losses.npy``."""
    loaded = load_run(run_dir, dev)
    cfg = loaded.cfg
    batches = TokenBatches(cfg.data.path, "val", cfg.data.seq_len, cfg.train.batch_size, shuffle=False,
                           vocab_size=cfg.model.vocab_size)
    losses = token_losses(loaded.model, batches, dev, cfg.train.dtype)  # [W, S]
    del loaded
    np.save(run_dir / "val_token_losses.npy", losses.numpy().astype(np.float16).reshape(-1))
    seq = losses.shape[1]
    edges = [b for b in POSITION_BINS if b < seq] + [seq]
    by_pos = {f"{a}-{b - 1}": float(losses[:, a:b].mean()) for a, b in zip(edges, edges[1:])}
    stream = np.concatenate([np.asarray(a) for a in split_tokens(cfg.data.path, "val")])
    eot = load_index(cfg.data.path)["eot_id"]
    n = losses.numel()
    doc = np.cumsum(stream[:n] == eot)  # flat i predicts stream[i + 1]: its document = EOTs in stream[:i + 1]
    flat = losses.reshape(-1).double().numpy()
    tokens = np.bincount(doc)
    by_doc = np.bincount(doc, weights=flat) / np.maximum(tokens, 1)
    return {"val_loss_full": float(flat.mean()), "val_tokens_full": int(n), "val_loss_by_position": by_pos,
            "val_loss_by_document": [round(float(v), 4) for v in by_doc], "val_tokens_by_document": tokens.tolist()}


def _train_one(cfg: Config, run_dir: Path, after: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Train (or skip / resume) one run and evaluate it; the row fields it produces."""
    fields: dict[str, Any] = {}
    summary = _finished(run_dir)
    if summary is None:
        t0 = time.perf_counter()
        summary = train(cfg, run_dir, progress=progress)
        fields["wall_s"] = time.perf_counter() - t0
    return {**fields, **_summary_fields(summary), **run_after(run_dir, after, summary)}


def _summary_fields(summary: dict[str, Any]) -> dict[str, Any]:
    return {"status": "interrupted" if summary.get("interrupted") else "done", "step": summary.get("step"),
            "tokens": summary.get("tokens_seen"), "val_loss": summary.get("val_loss"),
            "val_bpb": summary.get("val_bpb"), "tokens_per_s": summary.get("tokens_per_s"),
            "device": summary.get("device")}


def run_experiment(name: str, out: str | Path, extra: list[str] = (), only: list[str] | None = None,
                   progress: bool = True, jobs: int = 1, worker: bool = False) -> dict[str, Any]:
    path = find_experiment(name)
    spec = load_experiment(path)
    runs = run_configs(spec, list(extra))
    sizes = check_equal(spec, runs)
    after = spec.get("after", {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(r, cfg) for r, cfg in runs if not only or r["name"] in only]
    if worker:  # one run, in a process of its own (--jobs); the parent keeps results.json
        for r, cfg in todo:
            _train_one(cfg, out / "runs" / r["name"], after, progress)
        return {"runs": []}
    results: dict[str, Any] = {
        "experiment": path.stem, "description": spec.get("description", ""),
        "command": "ultramem experiment " + " ".join([path.stem, "--out", str(out), *extra]),
        "device": None, "runs": [],
    }
    rows = {r["name"]: {"name": r["name"], "preset": r.get("preset"), "family": r.get("family", ""),
                        "overrides": r.get("overrides", []), "status": "pending", **sizes[r["name"]]}
            for r, _ in runs}

    def write() -> None:
        results["runs"] = list(rows.values())
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(out / "results.json")

    def record(name: str, fields: dict[str, Any]) -> None:
        rows[name].update(fields, val_curve=_val_curve(out / "runs" / name))
        results["device"] = fields.get("device") or results["device"]
        write()

    if jobs > 1:
        _run_parallel(path, out, todo, extra, jobs, rows, record, write)
        return results
    for r, cfg in todo:
        rows[r["name"]]["status"] = "running"
        write()
        try:
            fields = _train_one(cfg, out / "runs" / r["name"], after, progress)
        except Exception as e:  # noqa: BLE001 -- record it, keep the other runs
            record(r["name"], {"status": f"failed: {type(e).__name__}: {e}"})
            continue
        record(r["name"], fields)
        if fields["status"] == "interrupted":
            break
    write()
    return results


def _run_parallel(path: Path, out: Path, todo: list, extra: list[str], jobs: int, rows: dict, record, write) -> None:
    """Up to ``jobs`` runs at once, each ``ultramem experiment PATH --only NAME --worker``. A
    signal (SIGINT/SIGTERM reach the workers too, as one process group) starts no more runs."""
    stopping = []
    old = {s: signal.signal(s, lambda *_: stopping.append(1)) for s in (signal.SIGINT, signal.SIGTERM)}
    pending, active = [r["name"] for r, _ in todo], {}
    try:
        while pending or active:
            while pending and len(active) < jobs and not stopping:
                name = pending.pop(0)
                (out / "runs").mkdir(parents=True, exist_ok=True)
                log = open(out / "runs" / f"{name}.log", "ab")  # noqa: SIM115 (closed when it ends)
                cmd = [sys.executable, "-m", "ultramem.cli", "experiment", str(path), *extra, "--out", str(out),
                       "--only", name, "--worker", "--no-progress"]
                active[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
                rows[name]["status"] = "running"
                write()
            if stopping and not active:
                break
            time.sleep(1.0)
            for name, (proc, log) in list(active.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del active[name]
                summary = _read(out / "runs" / name / "summary.json")
                tail = (out / "runs" / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:]
                why = f"exit {proc.returncode}: {' '.join(tail)[:300]}"
                if summary is None:
                    record(name, {"status": f"failed: {why}"})
                    continue
                fields = {**_summary_fields(summary), **(_read(out / "runs" / name / "after.json") or {})}
                if proc.returncode != 0:  # trained, but the after-run evaluation did not finish
                    fields["status"] += f"; after-run evaluation failed: {why}"
                record(name, fields)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    write()


def _read(p: Path) -> dict[str, Any] | None:
    return json.loads(p.read_text()) if p.is_file() else None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="run an experiment from experiments/NAME.json (resumable)")
    p.add_argument("name", nargs="?", help="experiment name (experiments/NAME.json) or a .json path")
    p.add_argument("--out", help="experiment directory (runs/ and results.json)")
    p.add_argument("--only", nargs="*", default=None, help="run only these runs (by name)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each (default 1)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
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
    if args.jobs < 1:
        raise ConfigError(f"--jobs={args.jobs}: must be >= 1")
    res = run_experiment(args.name, args.out, args.overrides, args.only, progress=not args.no_progress,
                         jobs=args.jobs, worker=args.worker)
    for row in res["runs"]:
        loss = f"{row['val_loss']:.4f}" if row.get("val_loss") is not None else "-"
        print(f"{row['name']:24s} {row['status']:12s} val {loss}", file=sys.stdout)
    return 0 if all(r["status"] in ("done", "pending") for r in res["runs"]) else 1
