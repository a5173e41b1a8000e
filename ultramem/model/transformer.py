"""Pre-LayerNorm decoder hosting ffn and memory layers (math.md §1).

Data flow for block i (1-based)::

    x, h = block_i(x, before_ffn=launch)  # Block.forward:
                                          #   x = x + attn(input_layernorm(x))
                                          #   h = post_attention_layernorm(x)  "normalised FFN input"
                                          #   launch(h): each memory span i:j -> out = memory(h),
                                          #              held until block j (a side stream with overlap)
                                          #   x = x + ffn(h)   (model.ffn, unless memory replaces it)
    x = x + sum(outputs of spans ending at block i)

``Transformer.forward`` is a loop over ``self.blocks`` (so FSDP and ``torch.compile`` can wrap
each ``model.blocks[i]``) plus the memory layers in ``self.memory``, called between blocks as
the one wiring plan (:meth:`ModelConfig.wiring`) says. Layers are built from ``model.ffn`` and
``model.memory`` through the layer registry; the model never branches on layer type names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ultramem.config import ModelConfig
from ultramem.layers.base import SparseLayer
from ultramem.layers.mlp import MLP
from ultramem.layers.norm import make_norm
from ultramem.layers.state import LayerState
from ultramem.model.attention import Attention, Rotary
from ultramem.model.decode_state import DecodeState, KVCache
from ultramem.ops.skinny_linear import skinny_linear


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, V]
    loss: torch.Tensor | None = None  # LM cross-entropy (mean over tokens)
    aux_loss: torch.Tensor | None = None  # sum of every layer's weighted aux losses
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # "layer.name" -> value
    metrics: dict[str, float] = field(default_factory=dict)


class Block(nn.Module):
    """One decoder block: attention and the block's FFN (``None`` where a memory layer
    replaces it). Memory layers are not part of the block: they read the ``h`` it returns."""

    def __init__(self, cfg: ModelConfig, index: int, rotary: Rotary, ffn: SparseLayer | None) -> None:
        super().__init__()
        self.index = index  # 1-based
        self.input_layernorm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, rotary, cfg.dropout)
        self.post_attention_layernorm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.ffn = ffn
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        kv_len: torch.Tensor | None = None,
        ffn_state: LayerState | None = None,
        before_ffn: Callable[[torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, S, D]`` -> ``(x [B, S, D], h [B, S, D])``: the residual stream after attention
        and the FFN, and ``h``, the normalised FFN input that memory spans starting here read.

        ``cache, positions, kv_len``: this block's KV cache and the step's positions when decoding
        (see :class:`DecodeState`); ``ffn_state``: the FFN's decode state. ``before_ffn(h)`` runs
        between attention and the FFN: the model launches the memory spans that read this block
        there, so that with overlap they run beside the FFN (math.md §7.4)."""
        x = x + self.drop(self.attn(self.input_layernorm(x), cache, positions, kv_len))
        h = self.post_attention_layernorm(x)
        if before_ffn is not None:
            before_ffn(h)
        if self.ffn is not None:
            x = x + self.drop(self.ffn(h, ffn_state))
        return x, h


class Transformer(nn.Module):
    """Decoder LM. ``forward(idx [B, S], targets [B, S] | None, state: DecodeState | None) -> ModelOutput``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.wiring = plan = cfg.wiring()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(
            Block(cfg, i, self.rotary, None if shape is None else cfg.ffn.build(shape))
            for i, shape in enumerate(plan.ffn, 1)
        )
        mem = cfg.memory
        self.memory_shared = mem.build_shared(plan.shared) if mem is not None else None
        self.memory = nn.ModuleList(
            [mem.build(shape, self.memory_shared) for shape in plan.memory] if mem is not None else []
        )
        self.drop = nn.Dropout(cfg.dropout)  # on memory outputs, as on every residual branch
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: ModelConfig, device: str | torch.device = "cpu") -> Transformer:
        """Build on the meta device, materialise on ``device``, then initialise every weight."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device)
        model.init_weights()
        return model

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every initialisation in one place: embeddings N(0, init_std); attention and FFN
        projections N(0, init_std) with output projections scaled by 1/sqrt(2L); norms to
        identity; sparse layers by their own ``init_weights`` (math.md §3.9, §4.5)."""
        std = self.cfg.init_std
        nn.init.normal_(self.embed_tokens.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        self.rotary.reset_parameters()
        for block in self.blocks:
            block.attn.init_weights(std, self.cfg.n_layers)
            block.input_layernorm.reset_parameters()
            block.post_attention_layernorm.reset_parameters()
        self.norm.reset_parameters()
        for layer in self.sparse_layers():
            layer.init_weights()
        if self.memory_shared is not None and hasattr(self.memory_shared, "init_weights"):
            self.memory_shared.init_weights()

    def sparse_layers(self) -> list[SparseLayer]:
        return [m for m in self.modules() if isinstance(m, SparseLayer)]

    # ---- forward ---------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        state: DecodeState | None = None,
        lengths: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> ModelOutput:
        """``idx [B, S]`` token ids. ``state``: a :class:`DecodeState` (``DecodeState.allocate``)
        the call reads and writes in place: the tokens go at ``state.pos + [0, S)`` and
        ``state.pos`` then advances by ``lengths [B]`` (right-padded ragged input: sequence ``b``
        has ``lengths[b]`` valid tokens; default ``S``). ``last_only``: logits ``[B, 1, V]`` of
        each sequence's last valid token only (prefill without the ``[B, S, V]`` tensor)."""
        x = self.embed_tokens(idx)
        s = idx.shape[1]
        positions, kv_len = state.begin(s, lengths) if state is not None else (None, None)
        pending: dict[int, list] = {}  # block j -> outputs (or side-stream handles) of spans ending there
        for block in self.blocks:
            i = block.index
            reads = self.wiring.reads(i)

            def launch(h: torch.Tensor, reads=reads) -> None:  # memory spans reading block i
                for n in reads:
                    mem, dst = self.memory[n], self.wiring.spans[n].dst
                    if state is None:
                        pending.setdefault(dst, []).append(mem(h))
                    else:
                        fn = lambda t, mem=mem, st=state.memory[n]: mem(t, st)  # noqa: E731
                        pending.setdefault(dst, []).append(state.run_memory(fn, h))

            if state is None:
                x, _ = block(x, before_ffn=launch if reads else None)
            else:
                x, _ = block(x, state.kv[i - 1], positions, kv_len, state.ffn[i - 1],
                             before_ffn=launch if reads else None)
            for y in pending.pop(i, []):
                x = x + self.drop(y if state is None else state.join(y))
        if state is not None:
            state.end(s, lengths)
        if last_only:
            last = (lengths - 1 if lengths is not None else torch.full_like(idx[:, 0], s - 1)).clamp_min(0)
            x = x.gather(1, last.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))
        x = self.norm(x)
        logits = skinny_linear(x, self.lm_head.weight if self.lm_head is not None else self.embed_tokens.weight)
        return self._output(logits, targets)

    def pack_projections(self) -> None:
        """Pack the projections that read one input (each block's q/k/v, SwiGLU's gate/up) into
        one weight buffer each, for inference (:mod:`ultramem.layers.packed`; same parameters,
        same values, same state dict). The engine calls it on CUDA."""
        for mod in self.modules():
            if isinstance(mod, (Attention, MLP)):
                mod.pack_projections()

    def _output(self, logits: torch.Tensor, targets: torch.Tensor | None) -> ModelOutput:
        aux_losses: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        for name, mod in self.named_modules():
            if isinstance(mod, SparseLayer):
                aux, met = mod.pop_aux()
                aux_losses.update({f"{name}.{k}": v for k, v in aux.items()})
                metrics.update({f"{name}.{k}": float(v) for k, v in met.items()})
        aux_total = sum(aux_losses.values()) if aux_losses else None
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return ModelOutput(logits, loss, aux_total, aux_losses, metrics)

    def set_track_metrics(self, on: bool) -> None:
        for layer in self.sparse_layers():
            layer.track_metrics = on

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        for layer in self.sparse_layers():
            layer.after_optimizer_step(step)

    def num_params(self, exclude_embeddings: bool = True) -> int:
        """Parameters as the accounting counts them (math.md §1: no embeddings, no LM head)."""
        seen: set[int] = set()
        total = 0
        skip = {id(self.embed_tokens.weight)}
        if self.lm_head is not None:
            skip.add(id(self.lm_head.weight))
        for p in self.parameters():
            if id(p) in seen or (exclude_embeddings and id(p) in skip):
                continue
            seen.add(id(p))
            total += p.numel()
        return total
