"""Tuning switches of the op kernels, in one small dataclass (no environment variables).

The defaults are the measured choices (figures: docs/results/kernels-2026-11.md); a field
changes a choice for every later call, :func:`tuned` for a block only::

    from ultramem.ops.tuning import tuned
    with tuned(skinny_linear_max_rows=8):
        ...

Tile overrides exist for tests and tuning sweeps: they let one shape exercise a tile path the
defaults pick only for other shapes. Importing this module imports no kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from ultramem.errors import ConfigError


@dataclass
class Tuning:
    """Op kernel switches; each field says which op reads it and why it defaults as it does."""

    # skinny_linear: rows up to which the GEMV kernel replaces cuBLAS (a win at 1 row, a loss
    # at 4 on H200); the kernel itself handles up to skinny_linear.triton.KERNEL_MAX_ROWS
    skinny_linear_max_rows: int = 1
    # lookup_reduce forward tile (BLOCK_N, BLOCK_D, num_warps[, PREFETCH, IDX_REGS, NS, EVICT,
    # ACC]) for every shape; None: the measured choice per shape class (_fwd_blocks)
    lookup_fwd_tile: tuple[int, ...] | None = None
    # lookup_reduce value-gradient tile (BLOCK_R, BLOCK_D, num_warps, UNROLL); None: measured
    lookup_dense_tile: tuple[int, int, int, int] | None = None
    # decode_attention split-KV tile (BLOCK_N, num_warps, target_programs); None: the defaults of
    # decode_attention.triton.plan (BLOCK_N ~4 K fp32 elements / (G * hd), 2 warps, 1024 programs)
    decode_attention_tile: tuple[int, int, int] | None = None
    # attention="auto" decode steps: the split-KV kernels while batch * H_kv is at most this, the
    # fused rotary + write then masked SDPA ("rope_sdpa") above. H200, dense-1.6b (H_kv 16),
    # decode-h200-f.json: B=1 split-KV 2.66 ms, rope_sdpa 2.91, SDPA 4.15; B=8 3.84 / 3.68 / 5.00;
    # B=64 12.96 / 10.32 / 11.73 (SDPA reads a large cache at 3-4.5 TB/s, split-KV ~3; docs/inference.md)
    decode_attention_max_heads: int = 16
    # overlap=True decode: the CUDA priority of the memory layers' side stream (lower is higher;
    # -1 the highest on current GPUs, 0 the default stream's), read when a DecodeState is
    # allocated. H200, graphed, decode-step ms at 0 / -1 (docs/results/s7-ab-h200.json):
    # ultramem-v2-1b-7b B=1 1.962 / 1.839, B=8 2.621 / 2.615; ultramem-1.6b-x12 and the 227M V2
    # within 0.4 % either way: the chain's small kernels get SMs before the FFN's GEMV blocks
    overlap_stream_priority: int = -1


TUNING = Tuning()


@contextlib.contextmanager
def tuned(**changes: object) -> Iterator[Tuning]:
    """Set fields of :data:`TUNING` for the block, then restore them."""
    names = {f.name for f in dataclasses.fields(Tuning)}
    for name in changes:
        if name not in names:
            raise ConfigError(f"tuned: unknown field {name!r}; fields: {', '.join(sorted(names))}")
    old = {name: getattr(TUNING, name) for name in changes}
    for name, value in changes.items():
        setattr(TUNING, name, value)
    try:
        yield TUNING
    finally:
        for name, value in old.items():
            setattr(TUNING, name, value)
