"""Memory-layer placement strings (SPEC §1).

``"3:5/6:8/9:11"``: memory layer ``i:j`` reads block i's normalised FFN input and adds its output
to the residual stream after block j. Blocks are numbered **1..L** (the paper's convention:
the 1.6B model, 32 blocks, uses ``28:32``). ``i:i`` runs parallel to block i's FFN.
``"full"`` means ``i:i`` for every block (UltraMemV2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ultramem.errors import ConfigError


@dataclass(frozen=True)
class Span:
    src: int  # 1-based block whose normalised FFN input the layer reads
    dst: int  # 1-based block after which the output is added

    def __str__(self) -> str:
        return f"{self.src}:{self.dst}"


def parse_placement(text: str, n_layers: int, memory_cfg: Any = None) -> list[Span]:
    """Parse and check a placement string; raise ConfigError with the offending part."""

    where = "model.memory.placement"
    text = (text or "").strip()
    if not text:
        raise ConfigError(f"{where} is empty; use e.g. '3:5/6:8/9:11', '6:6' or 'full'")
    if text == "full":
        spans = [Span(i, i) for i in range(1, n_layers + 1)]
    else:
        spans = []
        for part in text.split("/"):
            bits = part.split(":")
            if len(bits) != 2 or not all(b.strip().isdigit() for b in bits):
                raise ConfigError(
                    f"{where}={text!r}: part {part!r} is not 'i:j' with whole numbers "
                    "(blocks are numbered 1..n_layers)"
                )
            i, j = (int(b) for b in bits)
            if not 1 <= i <= n_layers or not 1 <= j <= n_layers:
                raise ConfigError(
                    f"{where}={text!r}: {part!r} is out of range; blocks are 1..{n_layers} "
                    f"(model.n_layers={n_layers})"
                )
            if j < i:
                raise ConfigError(
                    f"{where}={text!r}: {part!r} has j < i; a memory layer adds its output at or "
                    "after the block it reads from"
                )
            spans.append(Span(i, j))
    if memory_cfg is not None:
        _check_overlaps(spans, text, memory_cfg)
        if getattr(memory_cfg, "replace_ffn", False) and any(s.src != s.dst for s in spans):
            raise ConfigError(
                f"model.memory.replace_ffn=true needs i:i spans, got {where}={text!r}"
            )
    return spans


def _check_overlaps(spans: list[Span], text: str, memory_cfg: Any) -> None:

    dupes = sorted({str(s) for s in spans if spans.count(s) > 1})
    if dupes:
        raise ConfigError(f"model.memory.placement={text!r}: {', '.join(dupes)} appears twice")
    if getattr(memory_cfg, "allows_overlapping_spans", False):
        return
    ordered = sorted(spans, key=lambda s: (s.src, s.dst))
    for a, b in zip(ordered, ordered[1:]):
        if b.src <= a.dst:
            raise ConfigError(
                f"model.memory.placement={text!r}: spans {a} and {b} overlap at block {b.src}; "
                f"{memory_cfg.type} layers need disjoint spans (each runs across its own span)"
            )
