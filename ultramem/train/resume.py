"""What makes a resume exact, and the checks that refuse an inexact one.

A checkpoint's ``state.pt`` holds the step (= the data position, the sampler is stateless),
the tokens seen, the RNG states (torch CPU/CUDA, Python) and the dataset's identity
(:func:`ultramem.data.index.dataset_identity`). Resuming restores all of them; it is refused
(with the differences) when the config changed in a field that affects the numbers, or when
the dataset's bytes changed (re-prepared with other text). ``--force`` accepts both; weights
whose shapes no longer fit the model are refused anyway (:func:`ultramem.checkpoint.load_model_weights`).

Resuming at another world size is exact when the global batch is kept: ``train.batch_size``
is per process, so it is compared as ``batch_size x processes`` (checkpoints record their
world size); how the processes split the work (``train.parallel``, ``memory_parallel``,
``memory_partition``) may change freely (rounding aside, the same numbers).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from ultramem.data.index import identity_diff
from ultramem.errors import ConfigError, DataError

# fields that may change between a checkpoint and its resume without --force (no effect on
# the numbers computed)
RESUME_SAFE = {"train.log_every", "train.eval_every", "train.eval_batches", "train.ckpt_every",
               "train.keep_last", "train.tensorboard", "train.peak_tflops", "train.checkpoint",
               "train.spike_factor", "train.spike_window",
               "train.parallel", "train.memory_parallel", "train.memory_partition", "train.memory_overlap"}
GLOBAL_BATCH = "train.batch_size x processes"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any], old_world: int | None = None,
                new_world: int = 1) -> list[str]:
    """The fields that differ (outside :data:`RESUME_SAFE`); with ``old_world`` (the
    checkpoint's world size) the batch is compared globally (:data:`GLOBAL_BATCH`)."""
    a, b = flatten(old), flatten(new)
    if old_world is not None and "train.batch_size" in a and "train.batch_size" in b:
        a[GLOBAL_BATCH], b[GLOBAL_BATCH] = a.pop("train.batch_size") * old_world, b.pop("train.batch_size") * new_world
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in RESUME_SAFE]


def check_resume(run_dir: Any, old_cfg: dict[str, Any], new_cfg: dict[str, Any],
                 old_data: dict[str, Any] | None, new_data: dict[str, Any], force: bool,
                 old_world: int | None = None, new_world: int = 1) -> list[str]:
    """Raise unless resuming ``old`` (saved by ``old_world`` processes; None: not recorded)
    as ``new`` on ``new_world`` is exact (or forced); returns the forced changes."""
    diff = config_diff(old_cfg, new_cfg, old_world, new_world)
    if diff and not force:
        raise ConfigError(f"{run_dir} was trained with a different config; refusing to resume "
                          f"(pass --force to resume anyway, or use a new --out): " + "; ".join(diff))
    data = identity_diff(old_data, new_data) if old_data is not None else []
    if data and not force:
        raise DataError(f"the dataset {new_cfg['data']['path']} changed since {run_dir}'s checkpoint "
                        f"(was it prepared again?): " + "; ".join(data) +
                        "; the resume would not be exact -- restore the data, pass --force to train on "
                        "the new data anyway, or --restart")
    return diff + data


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
