"""Distributed checkpoints that reshard: ``torch.distributed.checkpoint`` (DCP), atomic and verified.

Layout: ``RUN/dcp/step_0000100/`` holding DCP's files (``.metadata`` and one ``__R_0.distcp``
per writing rank: each rank writes its own shards, nothing is gathered), ``state.pt`` (the
trainer state, rank 0), ``config.json`` (the trainer's resolved config, when given) and
``manifest.json`` (written last: size and sha256 of every file).

The trainer writes these when its model is sharded (``train.parallel=fsdp`` on several
processes) and :mod:`ultramem.checkpoint`'s full-weight ones otherwise; :func:`latest_any`
is the newest of either kind, and :func:`load_any` reads either into a model on one process
(evaluation, inference, export).

Resharding: the state dicts are keyed by parameter name (FQN) whatever the wrapping
(``torch.distributed.checkpoint.state_dict``), and DCP loads any saved sharding into any
target sharding -- a run saved on ``mp = 2`` ranks (row- or column-wise) loads on one process,
and one saved by a single process loads into a sharded model (docs/distributed.md §5).

Atomicity (the guarantees of :mod:`ultramem.checkpoint`): every rank writes into
``.tmp-step_0000100/`` (DCP fsyncs each file); after a barrier rank 0 writes ``state.pt``
and the manifest, fsyncs them and the directory, renames it to its final name and fsyncs the
parent. A rank killed mid-save leaves only the ``.tmp-*`` directory, which
:func:`list_checkpoints` ignores and the next save removes; :func:`load` refuses a
checkpoint whose manifest is missing or whose files do not match it (rank 0 checks, every
rank raises). Weights with a NaN or an infinity are never saved (every rank checks its
shards; all raise), so rotation never replaces a good checkpoint by a diverged one.
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

from ultramem import checkpoint as ckpt
from ultramem.checkpoint import MANIFEST, completed_steps, fsync_dir, publish, sha256_file, verify_manifest
from ultramem.errors import CheckpointError

SUBDIR = "dcp"
STATE = "state.pt"
CONFIG = "config.json"


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


def is_dcp(path: str | Path) -> bool:
    """Whether checkpoint directory ``path`` is a DCP one (else :mod:`ultramem.checkpoint`'s)."""
    return (Path(path) / ".metadata").is_file()


def _step(path: Path) -> int:
    return int(path.name.split("_")[1])


def latest_any(run_dir: str | Path) -> Path | None:
    """The run's newest completed checkpoint of either kind (full or DCP), by step."""
    ckpts = ckpt.list_checkpoints(run_dir) + list_checkpoints(run_dir)
    return max(ckpts, key=lambda p: (_step(p), is_dcp(p))) if ckpts else None


def prune_other_kind(run_dir: str | Path, keep_last: int, written: Path) -> None:
    """Keep-last across both kinds (a run resumed at another world size writes the other
    kind): remove the checkpoints older than the newest ``keep_last`` of both together,
    never ``written``. Each save already rotates its own kind; this is rank 0's extra step."""
    if keep_last <= 0:
        return
    both = sorted(ckpt.list_checkpoints(run_dir) + list_checkpoints(run_dir), key=lambda p: (_step(p), is_dcp(p)))
    for old in both[:-keep_last]:
        if old != written:
            shutil.rmtree(old, ignore_errors=True)


def load_any(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load checkpoint ``path`` of either kind into an unsharded ``model`` (and
    ``optimizer``); returns the trainer state saved with it."""
    if is_dcp(path):
        return load(path, model, optimizer)
    return ckpt.load_checkpoint(path, model, optimizer)


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


def _all_ok(ok: bool) -> bool:
    """True on every rank when ``ok`` is true on every rank (a collective when a group is up)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0.0 if ok else 1.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag)
    return bool(flag.item() == 0)


def _non_finite(sd: dict[str, Any]) -> list[str]:
    """Names of this rank's model tensors (local shards) holding a NaN or an infinity."""
    local = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return ckpt.non_finite_tensors(local)


def save(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         state: dict[str, Any] | None = None, keep_last: int = 2, config: dict[str, Any] | None = None) -> Path:
    """Save checkpoint ``step`` of ``model`` (sharded or not) and ``optimizer``; every rank
    calls it. ``state``: small picklable trainer state (step, data position, ...), from rank 0;
    ``config``: the resolved config, written as ``config.json``. Keeps the newest
    ``keep_last`` (0: all). Returns the final directory. CheckpointError (on every rank, nothing
    written or rotated) when a weight is not finite."""
    root = Path(run_dir) / SUBDIR
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}"
    sd = _state_dicts(model, optimizer)
    bad = _non_finite(sd["model"])
    if not _all_ok(not bad):
        raise CheckpointError(f"refusing to save step {step}: non-finite weights ({', '.join(bad[:3]) or 'on another rank'}); "
                              f"the last good checkpoint is kept: {latest_any(run_dir) or 'none'}")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    _write_shards(tmp, sd)
    _barrier()
    if _rank() == 0:
        torch.save({"step": step, **(state or {})}, tmp / STATE)
        fsync_dir(tmp / STATE)
        if config is not None:
            (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            fsync_dir(tmp / CONFIG)
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


def verify_all(path: str | Path) -> None:
    """:func:`verify` on rank 0 (reading every file once, not once per rank), then the same
    CheckpointError on every rank, or none."""
    err = None
    if _rank() == 0:
        try:
            verify(path)
        except CheckpointError as e:
            err = str(e)
    if dist.is_initialized():
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        raise CheckpointError(err)


def read_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Verify (:func:`verify_all`), then the trainer state and the config saved with it (None
    when saved without one): what the trainer checks before it loads the weights."""
    path = Path(path)
    verify_all(path)
    config = json.loads((path / CONFIG).read_text()) if (path / CONFIG).is_file() else None
    return torch.load(path / STATE, map_location="cpu", weights_only=True), config


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         verified: bool = False) -> dict[str, Any]:
    """Verify (unless ``verified``: :func:`read_state` did), then load into ``model`` (and
    ``optimizer``) whatever their sharding; every rank calls it. Returns the trainer state
    saved with it."""
    path = Path(path)
    if not verified:
        verify_all(path)
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
