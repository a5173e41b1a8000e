"""The decode engine: batched, ragged generation over a preallocated :class:`DecodeState`,
one decode step (every block, memory layers, final norm, LM head, sampling, stop check)
captured as a CUDA graph per batch-size bucket and replayed.

Lifecycle of :meth:`Engine.generate_ids` for ``B`` prompts:

1. pick the bucket ``b >= B`` (powers of two up to ``max_batch``) and, on CUDA, capture its
   graph if this engine has not yet (lazy: warm-up steps on a side stream, then capture);
2. reset the state, prefill the right-padded prompts eagerly in chunks (``lengths`` per
   sequence; only each sequence's last logits are formed) and sample the first token;
3. replay the graph once per new token; every 16 steps the host looks whether all sequences
   have stopped (the only host syncs of the loop).

On the CPU, or with ``graphs=False``, step 3 calls the same step function eagerly.

``compile``: the model's forward of a decode step goes through ``torch.compile`` (Inductor
fuses the norms, rotary, residual adds and other small kernels between the matmuls) and the
compiled step is then captured in the same per-bucket CUDA graph; prefill stays eager. Compiling
happens in the bucket's warm-up, so the first use of each bucket takes the compile time.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from ultramem.errors import ConfigError
from ultramem.inference.sampling import Sampling, sample
from ultramem.model.attention import kernels_outside_compile
from ultramem.model.decode_state import DecodeState, bookkeeping_outside_compile
from ultramem.model.transformer import Transformer

CHECK_EVERY = 16  # decode steps between two host checks of "all sequences stopped"
MAX_STOP = 8  # stop ids per sequence (a fixed-size buffer the graph reads)


@dataclass
class Generated:
    """New token ids per prompt (stop token excluded) and where the time went."""

    ids: list[list[int]]
    prefill_s: float
    decode_s: float
    steps: int  # decode steps run (after the prefill's token)
    graphed: bool

    @property
    def new_tokens(self) -> int:
        return sum(len(x) for x in self.ids)

    @property
    def tokens_per_s(self) -> float:
        """New tokens over prefill + decode time."""
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)


def max_batch_buckets(max_batch: int) -> int:
    """How many batch buckets (1, 2, 4, ..., then ``max_batch``) an engine can hold."""
    return (max_batch - 1).bit_length() + 1


class _Bucket:
    """Static buffers of one batch bucket (views into the engine's state) and its graph."""

    def __init__(self, engine: Engine, b: int) -> None:
        dev, vocab = engine.device, engine.model.cfg.vocab_size
        self.b = b
        self.state = engine.state.narrow(b)
        self.tokens = torch.zeros(b, dtype=torch.long, device=dev)
        self.noise = torch.zeros(b, engine.sampling.noise_width(vocab), device=dev)
        self.stop = torch.full((b, MAX_STOP), -1, dtype=torch.long, device=dev)
        self.done = torch.zeros(b, dtype=torch.bool, device=dev)
        self.hist = torch.zeros(b, engine.max_len + 1, dtype=torch.long, device=dev)  # token by position
        self.graph: torch.cuda.CUDAGraph | None = None


class Engine:
    """Generation engine for ``model`` (eval mode, weights on their device).

    ``max_batch``: largest batch (buckets 1, 2, 4, ... up to it); ``max_len``: prompt + new tokens
    per sequence (default the model's context); ``graphs``: capture the decode step (default: on
    CUDA); ``overlap``: memory layers on a side stream (UltraMem §3.2, CUDA only); ``compile``:
    ``True`` or keyword arguments of ``torch.compile`` (e.g. ``{"mode": "max-autotune-no-cudagraphs"}``)
    to compile the decode step's forward (``dynamic=False``: one compile per bucket, attention
    over a fixed ``max_len`` as in a graph, also when stepping eagerly; the engine captures the
    graph itself, so a mode with its own CUDA graphs is refused); ``attention``: how decode steps
    read the KV cache, ``"auto"`` (on CUDA the split-KV kernels for small batches, the fused
    rotary + write then SDPA for larger ones) | ``"split_kv"`` | ``"rope_sdpa"`` | ``"sdpa"``
    (:meth:`DecodeState.allocate`); ``pack`` (default: on CUDA): :meth:`Transformer.pack_projections`
    first (each block's q/k/v, SwiGLU's gate/up as one GEMM; same parameters and values).
    """

    def __init__(self, model: Transformer, max_batch: int = 1, max_len: int | None = None,
                 sampling: Sampling | None = None, graphs: bool | None = None, overlap: bool = False,
                 prefill_chunk: int = 512, compile: bool | dict = False, attention: str = "auto",
                 pack: bool | None = None) -> None:
        self.model = model.eval()
        self.device = model.embed_tokens.weight.device
        self.sampling = sampling or Sampling()
        self.graphs = (self.device.type == "cuda") if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ConfigError("graphs=True needs the model on a CUDA device; use graphs=False on the CPU")
        self.max_batch = max_batch
        self.max_len = max_len or model.cfg.max_seq_len
        self.prefill_chunk = prefill_chunk
        if (self.device.type == "cuda") if pack is None else pack:
            model.pack_projections()  # q/k/v (and gate/up) in one GEMM each: same weights
        self.state = DecodeState.allocate(model, max_batch, self.max_len, overlap=overlap, attention=attention)
        self.buckets: dict[int, _Bucket] = {}
        self.compiled = bool(compile)
        self.forward = self._compiled(compile) if compile else self.model

    def _compiled(self, compile: bool | dict):
        """``torch.compile`` of the model for decode steps (see the class docstring)."""
        opts = dict(compile) if isinstance(compile, dict) else {}
        if opts.get("mode") in ("reduce-overhead", "max-autotune"):
            raise ConfigError(f"compile mode={opts['mode']!r} captures CUDA graphs itself; the engine "
                              "captures the step already: use 'default' or 'max-autotune-no-cudagraphs'")
        if self.state.overlap:
            raise ConfigError("compile with overlap=True: torch.compile does not trace the side stream; "
                              "use one or the other")
        bookkeeping_outside_compile()
        kernels_outside_compile()
        opts.setdefault("dynamic", False)
        # one compiled graph per batch bucket (1, 2, 4, ... max_batch), plus slack
        limit = max_batch_buckets(self.max_batch) + 4
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
        return torch.compile(self.model, **opts)

    # ---- one step ----------------------------------------------------------------------------
    def _step(self, bk: _Bucket) -> None:
        """Feed ``bk.tokens``, sample the next ones into ``bk.tokens``; all in place."""
        logits = self.forward(bk.tokens.view(-1, 1), state=bk.state).logits[:, -1]
        self._emit(bk, logits)

    def _emit(self, bk: _Bucket, logits: torch.Tensor) -> None:
        nxt = sample(logits, self.sampling, bk.noise if bk.noise.shape[1] else None)
        nxt = torch.where(bk.done, bk.tokens, nxt)  # stopped sequences repeat their last token
        bk.hist.scatter_(1, bk.state.pos.view(-1, 1).clamp_max(self.max_len), nxt.view(-1, 1))
        bk.done |= (nxt.view(-1, 1) == bk.stop).any(-1)
        bk.tokens.copy_(nxt)

    def bucket(self, batch: int) -> _Bucket:
        """The bucket for ``batch`` sequences, its graph captured on first use (CUDA)."""
        if not 0 < batch <= self.max_batch:
            raise ConfigError(f"batch of {batch} prompts; this engine holds 1..{self.max_batch} "
                              "(build it with a larger max_batch)")
        b = min(1 << (batch - 1).bit_length(), self.max_batch)
        if b not in self.buckets:
            bk = self.buckets[b] = _Bucket(self, b)
            if self.compiled:  # a fixed attention length, as in a graph: no recompile per step
                bk.state.kv_len = self.max_len
            if self.graphs:
                self._capture(bk)
        return self.buckets[b]

    @torch.no_grad()
    def _capture(self, bk: _Bucket) -> None:
        """Warm up (kernel selection, autotuning, allocator) on a side stream, then capture one
        step with the state's attention length fixed to ``max_len``. A layer that cannot be
        captured (host syncs) leaves the bucket eager, with a warning."""
        bk.state.kv_len = self.max_len
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._step(bk)
                    bk.state.filled = 0
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self._step(bk)
            bk.graph = graph
        except RuntimeError as err:  # e.g. a kernel that reads a count back to the host
            warnings.warn(f"decode step not capturable ({str(err).splitlines()[0]}); batch bucket "
                          f"{bk.b} decodes eagerly", stacklevel=3)
            bk.graph = None
        torch.cuda.synchronize(self.device)
        bk.state.kv_len = self.max_len if self.compiled else None
        self.state.reset()

    def step(self, bk: _Bucket) -> None:
        """One decode step of bucket ``bk``: graph replay, or the eager step."""
        if bk.graph is not None:
            bk.graph.replay()
            bk.state.filled = min(bk.state.filled + 1, self.max_len)  # what the eager step counts
        else:
            self._step(bk)

    # ---- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], max_new: int, stop: list[list[int]] | None = None,
                     seed: int = 0) -> Generated:
        """New ids for each prompt (stops at any id of ``stop[i]``, which is not returned)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token (use the end-of-text id for 'no prompt')")
        longest = max(len(p) for p in prompts)
        if max_new < 1 or longest + max_new > self.max_len:
            raise ConfigError(f"prompt of {longest} tokens + max_new={max_new} must fit the engine's "
                              f"max_len={self.max_len} (and max_new >= 1)")
        bk = self.bucket(len(prompts))
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self._load_stop(bk, len(prompts), stop)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        lengths = self._prefill(bk, prompts, gen)
        sync()
        t1 = time.perf_counter()
        steps = 0
        while steps < max_new - 1:
            if bk.noise.shape[1]:
                bk.noise.uniform_(generator=gen)
            self.step(bk)
            steps += 1
            if steps % CHECK_EVERY == 0 and bool(bk.done[: len(prompts)].all()):
                break
        sync()
        t2 = time.perf_counter()
        hist = bk.hist[: len(prompts)].tolist()
        stops = [set(s) for s in (stop or [[]] * len(prompts))]
        out = []
        for i, n in enumerate(lengths):
            row = hist[i][n : n + steps + 1]
            cut = next((j for j, t in enumerate(row) if t in stops[i]), len(row))
            out.append(row[:cut])
        return Generated(out, t1 - t0, t2 - t1, steps, bk.graph is not None)

    def _load_stop(self, bk: _Bucket, n: int, stop: list[list[int]] | None) -> None:
        """Copy the stop ids (padded with -1) into the bucket's fixed ``[b, MAX_STOP]`` buffer."""
        stop = stop or [[] for _ in range(n)]
        if len(stop) != n or any(len(s) > MAX_STOP for s in stop):
            raise ConfigError(f"stop: one list per prompt ({n}), each of at most {MAX_STOP} token ids")
        rows = [list(s) + [-1] * (MAX_STOP - len(s)) for s in stop] + [[-1] * MAX_STOP] * (bk.b - n)
        bk.stop.copy_(torch.tensor(rows, dtype=torch.long))
        bk.done.zero_()
        bk.done[n:] = True  # bucket padding rows never count as running

    def _prefill(self, bk: _Bucket, prompts: list[list[int]], gen: torch.Generator) -> list[int]:
        """Right-padded prompts in chunks of ``prefill_chunk``; samples each sequence's first token
        from its last prompt position. Padding rows of the bucket get a one-token prompt."""
        bk.state.reset()
        lens = [len(p) for p in prompts] + [1] * (bk.b - len(prompts))
        rows = [list(p) + [0] * (max(lens) - len(p)) for p in prompts] + [[0] * max(lens)] * (bk.b - len(prompts))
        ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        length = torch.tensor(lens, dtype=torch.long, device=self.device)
        last = None
        for off in range(0, ids.shape[1], self.prefill_chunk):
            chunk = ids[:, off : off + self.prefill_chunk]
            n = (length - off).clamp(0, chunk.shape[1])
            logits = self.model(chunk, state=bk.state, lengths=n, last_only=True).logits[:, 0]
            ends_here = ((length > off) & (length <= off + chunk.shape[1])).view(-1, 1)
            last = logits if last is None else torch.where(ends_here, logits, last)
        bk.tokens.copy_(ids[:, 0])
        if bk.noise.shape[1]:
            bk.noise.uniform_(generator=gen)
        self._emit(bk, last)
        return lens[: len(prompts)]
