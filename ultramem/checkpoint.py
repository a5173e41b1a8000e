"""Atomic, verified checkpoints.

Layout: ``RUN/checkpoints/step_0000100/`` holding

- ``model.safetensors``: the full (unsharded) weights; a tensor reachable under several names
  is stored once, the other names listed in the file's metadata (``aliases``);
- ``optimizer.pt``: the optimiser state dict;
- ``state.pt``: the trainer's state (step = data position, tokens seen, RNG states, the
  dataset's identity; see :mod:`ultramem.train.resume`);
- ``config.json``: the resolved config;
- ``manifest.json`` (written last): size and sha256 of each file above.

Atomicity: everything is written into ``.tmp-step_0000100-<pid>/``, each file fsynced, the
directory renamed to its final name (``rename`` is atomic on POSIX) and the parent fsynced.
A crash mid-save leaves only a ``.tmp-*`` directory, which :func:`list_checkpoints` ignores
and the next save removes. :func:`load_checkpoint` refuses a checkpoint whose manifest is
missing or whose files do not match it (truncated or corrupt).

Never saved: weights with a NaN or an infinity (:func:`save_checkpoint` refuses them, so
keep-last rotation can never replace a good checkpoint by a diverged one). A failed write (a
full disk, a read-only file system) removes its temporary directory and raises a
:class:`CheckpointError` naming the directory and the free space.

This module is the one place that reads and writes checkpoints: training, evaluation,
inference and export import it; it imports nothing of theirs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ultramem.errors import CheckpointError
from ultramem.outdir import fsync_dir

MANIFEST = "manifest.json"
FILES = ("model.safetensors", "optimizer.pt", "state.pt", "config.json")


def ckpt_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def completed_steps(root: Path) -> list[Path]:
    """The ``step_*`` directories under ``root`` that have a manifest, oldest first (a
    ``.tmp-*`` directory left by a crash is not one); shared with distributed/checkpoint.py."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoints (with a manifest), oldest first."""
    return completed_steps(ckpt_dir(run_dir))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_files(tmp: Path, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any],
                 state: dict[str, Any], config: dict[str, Any]) -> None:
    """The payload files (the step a crash test interrupts)."""
    save_weights(model_state, tmp / "model.safetensors")
    torch.save(optim_state, tmp / "optimizer.pt")
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_weights(sd: dict[str, torch.Tensor], path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in sd.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.contiguous().cpu()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, name in aliases.items():
        sd[alias] = sd[name]
    return sd


def non_finite_tensors(sd: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding a NaN or an infinity."""
    return [name for name, t in sd.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                    optim_state: dict[str, Any], state: dict[str, Any],
                    config: dict[str, Any], keep_last: int = 2) -> Path:
    """Write checkpoint ``step`` atomically (full state dicts, see
    :func:`ultramem.distributed.full_state_dicts`); keep the newest ``keep_last``.
    Refuses non-finite weights (CheckpointError; nothing is written or rotated)."""
    bad = non_finite_tensors(model_state)
    if bad:
        last = latest_checkpoint(run_dir)
        raise CheckpointError(
            f"refusing to save step {step}: non-finite values in {len(bad)} weight tensors "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
            f"the last good checkpoint is kept: {last or 'none'}")
    root = ckpt_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        tmp.mkdir()
        _write_files(tmp, model_state, optim_state, state, config)
        manifest = {"step": step, "files": {}}
        for name in FILES:
            _fsync_file(tmp / name)
            manifest["files"][name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_file(tmp / MANIFEST)
        fsync_dir(tmp)
    except Exception as e:  # a full disk is an OSError, torch.save's RuntimeError, a SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failure(root, final.name, e)) from e
    return publish(tmp, final, keep_last)


def publish(tmp: Path, final: Path, keep_last: int) -> Path:
    """Rename the fully written, fsynced ``tmp`` to ``final`` (swapping out a checkpoint of the
    same step), fsync the parent, then keep the newest ``keep_last`` completed checkpoints
    there; the new one is always kept. Shared with distributed/checkpoint.py."""
    root = final.parent
    if final.exists():  # re-saving a step (e.g. a signal right after a periodic save)
        old = root / f".tmp-old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    if keep_last > 0:  # only completed checkpoints count
        for old in completed_steps(root)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _write_failure(root: Path, name: str, e: BaseException) -> str:
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
    return (f"{root}: writing checkpoint {name} failed ({reason}; {free}); the previous "
            f"checkpoints are untouched -- free some space or choose another --out")


def verify_manifest(path: Path) -> dict[str, Any]:
    """``path/manifest.json``, after checking the size and sha256 of every file it lists;
    CheckpointError otherwise (shared with distributed/checkpoint.py, which checks its own
    file set)."""
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}; the checkpoint is incomplete (interrupted save?)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}/{MANIFEST}: corrupt ({e.msg})") from None
    for name, meta in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in the manifest)")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {meta['bytes']} (truncated?)")
        if sha256_file(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: sha256 differs from the manifest (corrupt)")
    return manifest


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The manifest, after checking every file's size and sha256; CheckpointError otherwise."""
    path = Path(path)
    manifest = verify_manifest(path)
    if set(manifest.get("files", {})) != set(FILES):
        raise CheckpointError(f"{path}/{MANIFEST}: lists {sorted(manifest.get('files', {}))}, expected {FILES}")
    return manifest


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Verify, then read (weights, optimiser state, trainer state with rng)."""
    path = Path(path)
    verify_checkpoint(path)
    weights = load_weights(path / "model.safetensors")
    optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    return weights, optim, torch.load(path / "state.pt", map_location="cpu", weights_only=True)


def upgrade_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``weights`` with older layouts rewritten by each module that defines
    ``upgrade_state_dict(state_dict, prefix)`` (the product-key retrieval: PKM / Memory+ keys saved
    as ``[H, 2, N, K]``). The modules also run it as a ``load_state_dict`` pre-hook; it is called
    here so the shape check below sees the layout the model loads."""
    out = dict(weights)
    for name, module in model.named_modules():
        upgrade = getattr(module, "upgrade_state_dict", None)
        if upgrade is not None:
            upgrade(out, f"{name}." if name else "")
    return out


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of ``optimizer``'s parameters in the order of its groups: position ``i``
    of a positional optimiser state dict (``optimizer.state_dict()``) is ``names[i]``."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def upgrade_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A copy of a full optimiser state dict (keyed by position, as ``optimizer.state_dict()``,
    or by parameter name) whose per-parameter tensors of the parameter's size (AdamW's moments)
    are rewritten like the weights (:func:`upgrade_weights`), so a checkpoint saved before a
    layout change resumes training, not only loads."""
    params = dict(model.named_parameters())
    order = optimizer_param_names(model, optimizer)
    out = {**state, "state": {}}
    for key, pstate in state.get("state", {}).items():
        name = order[key] if isinstance(key, int) and key < len(order) else key
        param = params.get(name) if isinstance(name, str) else None
        new = dict(pstate)
        if param is not None:
            for field, v in pstate.items():
                if isinstance(v, torch.Tensor) and v.numel() == param.numel() and v.shape != param.shape:
                    new[field] = upgrade_weights(model, {name: v})[name]
        out["state"][key] = new
    return out


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor], where: str | Path) -> None:
    weights = upgrade_weights(model, weights)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs the model's {tuple(own[k].shape)}"
             for k, v in weights.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise CheckpointError(f"{where}: weight shapes do not fit the model ({'; '.join(wrong[:3])}); "
                              f"the model.* config differs from the checkpoint's -- use a new --out")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not fit the model (missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}); was the config changed?")


def load_checkpoint(path: str | Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Verify, then load weights (and optimiser state) into an unsharded model; returns the
    trainer state (with rng)."""
    weights, optim, state = read_checkpoint(path)
    load_model_weights(model, weights, path)
    if optimizer is not None:
        optimizer.load_state_dict(optim)
    return state


def read_config(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: unreadable ({e})") from None
