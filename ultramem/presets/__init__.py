"""Named presets: functions returning a fresh :class:`~ultramem.config.Config`.

Modules register presets at import: ``baselines`` (dense, MoE, PKM, Memory+, OLMoE, tiny-*),
``memory`` (UltraMem / UltraMemV2 sizes), ``ablation`` (the UltraMem Table 2 ladder).
Each preset records the published figures it must match (``published``) so tests can check them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

from ultramem.config import Config
from ultramem.errors import ConfigError


@dataclass(frozen=True)
class Published:
    """Figures a preset must reproduce: params within 2 %, GFLOPs within 5 % (``None``: not
    published). ``convention`` states how the source counts when it differs from SPEC §1."""

    params: float | None = None  # absolute count
    gflops: float | None = None
    active_params: float | None = None
    source: str = ""
    convention: str = ""
    # V2 Table 10 counts differently from SPEC §1 (see SPEC §6): add the tied input embedding.
    embedding_in_params: bool = False
    embedding_in_active: bool = False
    params_tolerance: float = 0.02
    gflops_tolerance: float = 0.05


@dataclass(frozen=True)
class Preset:
    name: str
    make: Callable[[], Config]
    description: str
    published: Published = field(default_factory=Published)
    tags: tuple[str, ...] = ()


_PRESETS: dict[str, Preset] = {}


def register_preset(
    name: str, description: str, published: Published | None = None, tags: tuple[str, ...] = ()
) -> Callable[[Callable[[], Config]], Callable[[], Config]]:
    def wrap(fn: Callable[[], Config]) -> Callable[[], Config]:
        if name in _PRESETS:
            raise ValueError(f"preset {name!r} registered twice")
        _PRESETS[name] = Preset(name, fn, description, published or Published(), tags)
        return fn

    return wrap


def _load() -> None:
    from ultramem.presets import ablation, baselines, memory  # noqa: F401,PLC0415


def preset_names() -> list[str]:
    _load()
    return list(_PRESETS)


def get_preset_info(name: str) -> Preset:
    _load()
    if name not in _PRESETS:
        near = difflib.get_close_matches(name, list(_PRESETS), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise ConfigError(f"--preset={name!r} is not a preset{hint} (`ultramem info --list` lists them)")
    return _PRESETS[name]


def get_preset(name: str) -> Config:
    """A fresh config for preset ``name``."""
    return get_preset_info(name).make()
