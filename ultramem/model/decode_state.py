"""Decode state: everything a decoder carries from one call to the next, allocated once.

:class:`DecodeState` holds, for ``B`` sequences and at most ``L`` positions,

- per block a :class:`KVCache` ``k, v: [B, H_kv, L, hd]``, written in place at each sequence's
  own positions (so ragged, right-padded prompts share one batch);
- ``pos [B]``: how many tokens of each sequence are in the cache (the next write position);
- per FFN and per memory layer its :class:`~ultramem.layers.state.LayerState` (the query conv's
  rolling window), or ``None`` for layers that carry nothing.

Every tensor is preallocated and only written in place, so a decode step that reads and writes
the state can be captured once as a CUDA graph and replayed. ``Transformer.forward(idx, state=s,
lengths=n)`` writes the call's tokens at ``s.pos + [0, S)`` and then advances ``s.pos`` by
``n`` (the valid tokens of each sequence, default ``S``).

``overlap`` (UltraMem §3.2): a memory layer of span ``i:j`` reads block ``i``'s normalised FFN
input and is only added after block ``j``, so with ``overlap`` on (CUDA only) it runs on a side
stream, concurrently with the FFN of block ``i`` and blocks ``i+1..j``; see :class:`SideStream`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ultramem.errors import ConfigError
from ultramem.layers.state import LayerState
from ultramem.ops import decode_attention as decode_ops  # imports no Triton until a kernel is asked for
from ultramem.ops.tuning import TUNING

if TYPE_CHECKING:  # pragma: no cover
    from ultramem.model.transformer import Transformer


ATTENTION = ("auto", "sdpa", "split_kv", "rope_sdpa")  # how one-token steps read the cache (DecodeState.allocate)


@dataclass
class KVCache:
    """One block's keys and values, ``[B, H_kv, L, hd]`` each (rotary already applied to ``k``);
    ``attention``: how a one-token step reads them, ``"sdpa"`` (masked SDPA over ``kv_len``
    positions), ``"split_kv"`` (the decode kernels of ``ops/decode_attention``), ``"rope_sdpa"``
    (their fused rotary + cache write, then masked SDPA) or ``"auto"`` (split-KV while
    ``B * H_kv <= TUNING.decode_attention_max_heads``, else ``"rope_sdpa"``: a choice by shape,
    so a CUDA graph or a compiled step fixes it per batch bucket)."""

    k: torch.Tensor
    v: torch.Tensor
    attention: str = "sdpa"

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store ``k, v [B, H_kv, S, hd]`` at ``positions [B, S]`` (in place, no host sync)."""
        b, h, s, d = k.shape
        idx = positions.view(b, 1, s, 1).expand(b, h, s, d)
        self.k.scatter_(2, idx, k.to(self.k.dtype))
        self.v.scatter_(2, idx, v.to(self.v.dtype))

    def narrow(self, batch: int) -> KVCache:
        return KVCache(self.k[:batch], self.v[:batch], self.attention)


@dataclass
class DecodeState:
    """Preallocated decode state of ``batch`` sequences of at most ``max_len`` tokens.

    ``kv_len``: how many cache positions attention reads (``None``: all ``max_len``). Eager
    decoding keeps it at a host-side bound of ``pos.max() + S`` so short sequences do not pay
    for the whole cache; a CUDA graph needs it fixed (``None``) since the graph's shapes are.
    """

    kv: list[KVCache]
    pos: torch.Tensor  # [B] int64
    ffn: list[LayerState | None]
    memory: list[LayerState | None]
    max_len: int
    overlap: bool = False
    kv_len: int | None = None
    filled: int = 0  # host-side upper bound of pos.max() (eager bookkeeping, no sync)
    side: SideStream | None = field(default=None, repr=False)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def allocate(cls, model: Transformer, batch: int, max_len: int | None = None,
                 dtype: torch.dtype | None = None, overlap: bool = False, attention: str = "auto") -> DecodeState:
        """Zeroed state for ``model`` (on its device; K/V in ``dtype``, default the weights').

        ``attention`` of one-token steps: ``"split_kv"`` (the decode kernels; on CUDA, or on the
        CPU under ``TRITON_INTERPRET=1``), ``"rope_sdpa"``, ``"sdpa"``, or ``"auto"``: where the
        kernels can run, split-KV for small batches and ``"rope_sdpa"`` for larger ones (see
        :class:`KVCache`; measured on H200: docs/inference.md), elsewhere ``"sdpa"``."""
        cfg = model.cfg
        max_len = cfg.max_seq_len if max_len is None else max_len
        if batch <= 0:
            raise ConfigError(f"decode batch={batch} must be a positive integer")
        if not 0 < max_len <= cfg.max_seq_len:
            raise ConfigError(f"decode max_len={max_len} must be in [1, model.max_seq_len={cfg.max_seq_len}]; "
                              "shorten the prompt or the number of new tokens")
        ref = model.embed_tokens.weight
        device, dtype = ref.device, dtype or ref.dtype
        attention = _attention(attention, ref)
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        kv = [KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                      attention) for _ in model.blocks]
        ffn = [b.ffn.new_state(batch, device, dtype) if b.ffn is not None else None for b in model.blocks]
        memory = [m.new_state(batch, device, dtype) for m in model.memory]
        side = SideStream(device) if overlap and device.type == "cuda" else None
        return cls(kv, torch.zeros(batch, dtype=torch.long, device=device), ffn, memory, max_len,
                   overlap, None, 0, side)

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    def narrow(self, batch: int) -> DecodeState:
        """The first ``batch`` sequences as views (a CUDA graph of a smaller batch bucket reads
        and writes the same memory)."""
        narrow = lambda s: None if s is None else s.narrow(batch)  # noqa: E731
        return DecodeState([c.narrow(batch) for c in self.kv], self.pos[:batch], [narrow(s) for s in self.ffn],
                           [narrow(s) for s in self.memory], self.max_len, self.overlap, self.kv_len,
                           self.filled, self.side)

    def reset(self) -> None:
        """Forget every sequence (the cache's contents need no clearing: attention masks
        positions at or beyond ``pos``)."""
        self.pos.zero_()
        self.filled = 0
        for s in self.ffn + self.memory:
            if s is not None:
                s.reset()

    # ---- one forward call --------------------------------------------------------------------
    # ``begin`` and ``end`` keep host-side bookkeeping (``filled``, the layer states' ``lengths``)
    # that changes every step: under ``torch.compile`` they run eagerly (see
    # :func:`bookkeeping_outside_compile`).
    def begin(self, s: int, lengths: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Positions ``[B, S]`` of a call of ``s`` tokens and how many cache positions attention
        reads; hands ``lengths`` to the layer states. Raises if the call cannot fit."""
        if self.filled + s > self.max_len and not (self.pos.is_cuda and torch.cuda.is_current_stream_capturing()):
            raise ConfigError(f"decode state full: {self.filled} + {s} tokens exceed max_len={self.max_len} "
                              "(allocate a longer state or generate fewer tokens)")
        for st in self.ffn + self.memory:
            if st is not None:
                st.lengths = lengths
        positions = self.pos.view(-1, 1) + torch.arange(s, device=self.pos.device)
        kv_len = self.kv_len if self.kv_len is not None else min(self.filled + s, self.max_len)
        return positions, kv_len

    def end(self, s: int, lengths: torch.Tensor | None) -> None:
        self.pos.add_(s if lengths is None else lengths)
        self.filled = min(self.filled + s, self.max_len)
        for st in self.ffn + self.memory:
            if st is not None:
                st.lengths = None

    def run_memory(self, fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> object:
        """Start memory layer ``fn`` on ``h``: on the side stream when overlapping, else now.
        Returns a handle for :meth:`join`."""
        return self.side.launch(fn, h) if self.side is not None else fn(h)

    def join(self, handle: object) -> torch.Tensor:
        return self.side.join(handle) if self.side is not None else handle  # type: ignore[return-value]


def _attention(attention: str, ref: torch.Tensor) -> str:
    """``allocate``'s ``attention`` for ``ref``'s device: ``"auto"`` stays only where the kernels can run."""
    if attention not in ATTENTION:
        raise ConfigError(f"decode attention={attention!r} is not one of {', '.join(ATTENTION)}")
    if attention == "auto":
        return "auto" if decode_ops.triton_available(ref) else "sdpa"
    if attention in ("split_kv", "rope_sdpa") and not decode_ops.triton_available(ref):
        raise ConfigError(f"decode attention={attention!r} needs Triton and a CUDA device (the model is on "
                          f"{ref.device}); use attention='auto' or 'sdpa'")
    return attention


def bookkeeping_outside_compile() -> None:
    """Make ``DecodeState.begin`` / ``end`` run eagerly under ``torch.compile`` (a graph break
    each), so compiled graphs never guard on the step count and a decode step compiles once; and
    ``run_memory``, so the memory layers run as without compile (inside the CUDA graph all the same).
    Called by the engine before its first compile, not at import: ``torch.compiler.disable``
    imports ``torch._dynamo`` (and with it Triton and tqdm). Idempotent."""
    if getattr(DecodeState, "_eager_bookkeeping", False):
        return
    DecodeState.begin = torch.compiler.disable(DecodeState.begin)
    DecodeState.end = torch.compiler.disable(DecodeState.end)
    # The memory layers too: their decode path is already our fused Triton kernels, and traced by
    # Dynamo on the H200 (torch 2.11) they gave other tokens than the eager engine, while the same
    # model through Inductor on the CPU (the layers' PyTorch references) agrees. Training never
    # calls run_memory (no DecodeState), so a compiled training step still traces the layers.
    DecodeState.run_memory = torch.compiler.disable(DecodeState.run_memory)
    DecodeState._eager_bookkeeping = True


class SideStream:
    """A second CUDA stream for memory layers (UltraMem §3.2's overlap). Works eagerly and
    inside CUDA-graph capture: the event record/wait pairs become the graph's edges, and
    ``record_stream`` tells the allocator which stream still reads a tensor."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device, priority=TUNING.overlap_stream_priority)

    def launch(self, fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            y = fn(h)
            done = torch.cuda.Event()
            done.record(self.stream)
        h.record_stream(self.stream)
        y.record_stream(main)
        return y, done

    def join(self, handle: tuple[torch.Tensor, torch.cuda.Event]) -> torch.Tensor:
        y, done = handle
        torch.cuda.current_stream().wait_event(done)
        return y
