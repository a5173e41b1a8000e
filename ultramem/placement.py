"""Memory-layer placement strings and the model's wiring plan (math.md §1).

``"3:5/6:8/9:11"``: memory layer ``i:j`` reads block i's normalised FFN input and adds its output
to the residual stream after block j. Blocks are numbered **1..L** (the paper's convention:
the 1.6B model, 32 blocks, uses ``28:32``). ``i:i`` runs parallel to block i's FFN.
``"full"`` means ``i:i`` for every block (UltraMemV2).

:func:`plan_wiring` turns a model's sizes, FFN config and memory config into one
:class:`Wiring`: the spans, the blocks whose FFN a memory layer replaces, and the
:class:`~ultramem.layers.registry.ShapeContext` each layer is built, counted and validated
with. The model (``Transformer``), the accounting (``accounting.count``) and
``ModelConfig.validate`` all read this one plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ultramem.errors import ConfigError
from ultramem.layers.registry import LayerConfig, MemoryLayerConfig, ShapeContext

WHERE = "model.memory.placement"


@dataclass(frozen=True)
class Span:
    src: int  # 1-based block whose normalised FFN input the layer reads
    dst: int  # 1-based block after which the output is added

    def __str__(self) -> str:
        return f"{self.src}:{self.dst}"


def parse_placement(text: str, n_layers: int, memory_cfg: MemoryLayerConfig | None = None) -> list[Span]:
    """Parse and check a placement string; raise ConfigError with the offending part.

    With ``memory_cfg`` also check what the memory config needs of its spans: no duplicate or
    overlapping spans, and ``i:i`` spans only when it replaces the FFN."""
    text = (text or "").strip()
    if not text:
        raise ConfigError(f"{WHERE} is empty; use e.g. '3:5/6:8/9:11', '6:6' or 'full'")
    if text == "full":
        spans = [Span(i, i) for i in range(1, n_layers + 1)]
    else:
        spans = [_parse_span(part, text, n_layers) for part in text.split("/")]
    if memory_cfg is not None:
        _check_overlaps(spans, text, memory_cfg)
        if memory_cfg.replace_ffn and any(s.src != s.dst for s in spans):
            raise ConfigError(f"model.memory.replace_ffn=true needs i:i spans, got {WHERE}={text!r}")
    return spans


def _parse_span(part: str, text: str, n_layers: int) -> Span:
    bits = part.split(":")
    if len(bits) != 2 or not all(b.strip().isdigit() for b in bits):
        raise ConfigError(
            f"{WHERE}={text!r}: part {part!r} is not 'i:j' with whole numbers (blocks are numbered 1..n_layers)"
        )
    i, j = (int(b) for b in bits)
    if not 1 <= i <= n_layers or not 1 <= j <= n_layers:
        raise ConfigError(
            f"{WHERE}={text!r}: {part!r} is out of range; blocks are 1..{n_layers} (model.n_layers={n_layers})"
        )
    if j < i:
        raise ConfigError(
            f"{WHERE}={text!r}: {part!r} has j < i; a memory layer adds its output at or after the block it reads from"
        )
    return Span(i, j)


def _check_overlaps(spans: list[Span], text: str, memory_cfg: MemoryLayerConfig) -> None:
    dupes = sorted({str(s) for s in spans if spans.count(s) > 1})
    if dupes:
        raise ConfigError(f"{WHERE}={text!r}: {', '.join(dupes)} appears twice")
    ordered = sorted(spans, key=lambda s: (s.src, s.dst))
    for a, b in zip(ordered, ordered[1:]):
        if b.src <= a.dst:
            raise ConfigError(
                f"{WHERE}={text!r}: spans {a} and {b} overlap at block {b.src}; "
                f"{memory_cfg.type} layers need disjoint spans (each runs across its own span)"
            )


@dataclass(frozen=True)
class Wiring:
    """Where every sparse layer of a model goes and the shape it is built with.

    Blocks are 1-based in ``spans`` and ``reads(i)``; the tuples are indexed 0-based
    (``ffn[i - 1]`` is block i's FFN shape)."""

    spans: tuple[Span, ...]  # memory layer n reads block spans[n].src, adds after spans[n].dst
    ffn: tuple[ShapeContext | None, ...]  # per block: its FFN's shape; None where memory replaces it
    memory: tuple[ShapeContext, ...]  # per memory layer, in placement order
    shared: ShapeContext  # the shape of the memory config's shared module (a value pool)
    readers: tuple[tuple[int, ...], ...]  # per block: the memory layers that read it

    @property
    def n_layers(self) -> int:
        return len(self.ffn)

    @property
    def replaced(self) -> frozenset[int]:
        """1-based blocks whose FFN is replaced by their memory layer."""
        return frozenset(i for i, shape in enumerate(self.ffn, 1) if shape is None)

    def reads(self, block: int) -> tuple[int, ...]:
        """Memory layers (0-based, placement order) that read block ``block`` (1-based)."""
        return self.readers[block - 1]


def plan_wiring(d_model: int, n_layers: int, ffn: LayerConfig, memory: MemoryLayerConfig | None) -> Wiring:
    """The one wiring plan of a model with these sizes and layer configs (raises ConfigError
    for a bad placement)."""
    spans = tuple(parse_placement(memory.placement, n_layers, memory)) if memory is not None else ()
    replaced = {s.src for s in spans} if memory is not None and memory.replace_ffn else set()
    hidden, gated = ffn.ffn_shape()
    base = ShapeContext(d_model=d_model, n_layers=n_layers, n_mem_layers=len(spans),
                        ffn_hidden=hidden, ffn_gated=gated)
    blocks = range(1, n_layers + 1)
    return Wiring(
        spans=spans,
        ffn=tuple(None if i in replaced else replace(base, block_index=i) for i in blocks),
        memory=tuple(replace(base, mem_index=n, block_index=s.src) for n, s in enumerate(spans)),
        shared=base,
        readers=tuple(tuple(n for n, s in enumerate(spans) if s.src == i) for i in blocks),
    )
