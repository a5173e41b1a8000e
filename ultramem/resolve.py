"""Resolve a run config: dataclass defaults < preset < config file < dotted overrides (as lingua).

    cfg = load_config("tiny-pkm", config_file="my.json", overrides=["train.max_steps=20"])

This module sits above :mod:`ultramem.presets` (which imports :mod:`ultramem.config`), so the
config tree never imports the presets. ``ultramem.load_config`` is this function.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ultramem.config import Config, apply_override, overlay
from ultramem.presets import get_preset


def load_config(
    preset: str | None = None,
    config_file: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Defaults, then a preset, then a JSON config file (a path, or its dict) overlaid on it,
    then dotted overrides; validated. A file names only what it changes: the preset's other
    fields stay (a file saved from a resolved config names every field, so it wins whole)."""
    cfg = get_preset(preset) if preset else Config()
    if config_file is not None:
        d = config_file if isinstance(config_file, dict) else json.loads(Path(config_file).read_text())
        overlay(cfg, d)
    for item in overrides:
        apply_override(cfg, item)
    return cfg.validate()
