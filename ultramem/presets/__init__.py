"""Named presets: functions returning a fresh :class:`~ultramem.config.Config`.

Modules register presets at import: ``baselines`` (dense, MoE, PKM, Memory+, OLMoE, tiny-*),
``memory`` (UltraMem / UltraMemV2 sizes), ``ablation`` (the UltraMem Table 2 ladder).
Each preset records the published figures it must match (``published``) so tests can check them.
"""

from __future__ import annotations

import difflib

from ultramem.config import Config
from ultramem.errors import ConfigError
from ultramem.presets import ablation, baselines, memory  # noqa: F401  (each registers its presets)
from ultramem.presets.registry import PRESETS, Preset, Published, register_preset

__all__ = ["Preset", "Published", "get_preset", "get_preset_info", "preset_names", "register_preset"]


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset_info(name: str) -> Preset:
    if name not in PRESETS:
        near = difflib.get_close_matches(name, list(PRESETS), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise ConfigError(f"--preset={name!r} is not a preset{hint} (`ultramem info --list` lists them)")
    return PRESETS[name]


def get_preset(name: str) -> Config:
    """A fresh config for preset ``name``."""
    return get_preset_info(name).make()
