"""Distributed checkpoints that reshard: ``torch.distributed.checkpoint`` (DCP), atomic and verified.

Layout: ``RUN/dcp/step_0000100/`` holding DCP's files (``.metadata`` and one ``__R_0.distcp``
per writing rank: each rank writes its own shards, nothing is gathered), ``state.pt`` (the
trainer state, rank 0) and ``manifest.json`` (written last: size and sha256 of every file).

Resharding: the state dicts are keyed by parameter name (FQN) whatever the wrapping
(``torch.distributed.checkpoint.state_dict``), and DCP loads any saved sharding into any
target sharding -- a run saved on ``mp = 2`` ranks (row- or column-wise) loads on one process,
and one saved by a single process loads into a sharded model (docs/distributed.md §5).

Atomicity (the guarantees of :mod:`ultramem.checkpoint`): every rank writes into
``.tmp-step_0000100/`` (DCP fsyncs each file); after a barrier rank 0 writes ``state.pt``
and the manifest, fsyncs them and the directory, renames it to its final name and fsyncs the
parent. A rank killed mid-save leaves only the ``.tmp-*`` directory, which
:func:`list_checkpoints` ignores and the next save removes; :func:`load` refuses a
checkpoint whose manifest is missing or whose files do not match it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ultramem.checkpoint import MANIFEST, completed_steps, fsync_dir, publish, sha256_file, verify_manifest
from ultramem.errors import CheckpointError

SUBDIR = "dcp"
STATE = "state.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed DCP checkpoints (with a manifest), oldest first."""
    return completed_steps(Path(run_dir) / SUBDIR)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    sd: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        sd["optim"] = get_optimizer_state_dict(model, optimizer)
    return sd


def _write_shards(tmp: Path, sd: dict[str, Any]) -> None:
    """Every rank writes its shards (a collective when a process group is up)."""
    dcp.save(sd, checkpoint_id=str(tmp))


def save(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         state: dict[str, Any] | None = None, keep_last: int = 2) -> Path:
    """Save checkpoint ``step`` of ``model`` (sharded or not) and ``optimizer``; every rank
    calls it. ``state``: small picklable trainer state (step, data position, ...), from rank 0.
    Keeps the newest ``keep_last`` (0: all). Returns the final directory."""
    root = Path(run_dir) / SUBDIR
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    _write_shards(tmp, _state_dicts(model, optimizer))
    _barrier()
    if _rank() == 0:
        torch.save({"step": step, **(state or {})}, tmp / STATE)
        fsync_dir(tmp / STATE)
        manifest = {"format": "dcp", "step": step,
                    "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                              for p in _files(tmp)}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        fsync_dir(tmp / MANIFEST)
        fsync_dir(tmp)
        publish(tmp, final, keep_last)
    _barrier()
    return final


def verify(path: str | Path) -> dict[str, Any]:
    """The manifest, after checking every file's size and sha256; CheckpointError otherwise."""
    path = Path(path)
    manifest = verify_manifest(path)
    listed = manifest.get("files", {})
    extra = sorted(set(str(p.relative_to(path)) for p in _files(path)) - set(listed))
    if extra or STATE not in listed or ".metadata" not in listed:
        raise CheckpointError(f"{path}: files {extra} not in the manifest, or {STATE}/.metadata missing from it")
    return manifest


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Verify, then load into ``model`` (and ``optimizer``) whatever their sharding; every
    rank calls it. Returns the trainer state saved with it."""
    path = Path(path)
    verify(path)
    sd = _state_dicts(model, optimizer)
    try:
        dcp.load(sd, checkpoint_id=str(path))
    except Exception as e:  # noqa: BLE001 -- DCP raises a CheckpointException wrapping per-rank errors
        raise CheckpointError(f"{path}: does not fit the model or optimiser ({str(e).splitlines()[0][:200]}); "
                              "was the config changed?") from None
    set_model_state_dict(model, sd["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, sd["optim"])
    return torch.load(path / STATE, map_location="cpu", weights_only=True)
