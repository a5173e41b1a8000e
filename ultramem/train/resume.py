"""What makes a resume exact, and the checks that refuse an inexact one.

A checkpoint's ``state.pt`` holds the step (= the data position, the sampler is stateless),
the tokens seen, the RNG states (torch CPU/CUDA, Python) and the dataset's identity
(:func:`ultramem.data.index.dataset_identity`). Resuming restores all of them; it is refused
(with the differences) when the config changed in a field that affects the numbers, or when
the dataset's bytes changed (re-prepared with other text). ``--force`` accepts both; weights
whose shapes no longer fit the model are refused anyway (:func:`ultramem.checkpoint.load_model_weights`).
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
               "train.spike_factor", "train.spike_window"}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in RESUME_SAFE]


def check_resume(run_dir: Any, old_cfg: dict[str, Any], new_cfg: dict[str, Any],
                 old_data: dict[str, Any] | None, new_data: dict[str, Any], force: bool) -> list[str]:
    """Raise unless resuming ``old`` as ``new`` is exact (or forced); returns the forced changes."""
    diff = config_diff(old_cfg, new_cfg)
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
