"""The preset registry: :func:`register_preset` and what a preset records (imports no preset
module, so preset modules import it without a cycle; :mod:`ultramem.presets` imports them all)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ultramem.config import Config


@dataclass(frozen=True)
class Published:
    """Figures a preset must reproduce: params within 2 %, GFLOPs within 5 % (``None``: not
    published). ``convention`` states how the source counts when it differs from math.md §1."""

    params: float | None = None  # absolute count
    gflops: float | None = None
    active_params: float | None = None
    source: str = ""
    convention: str = ""
    # V2 Table 10 counts differently from math.md §1 (see math.md §6): add the tied input embedding.
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


PRESETS: dict[str, Preset] = {}


def register_preset(
    name: str, description: str, published: Published | None = None, tags: tuple[str, ...] = ()
) -> Callable[[Callable[[], Config]], Callable[[], Config]]:
    def wrap(fn: Callable[[], Config]) -> Callable[[], Config]:
        if name in PRESETS:
            raise ValueError(f"preset {name!r} registered twice")
        PRESETS[name] = Preset(name, fn, description, published or Published(), tags)
        return fn

    return wrap
