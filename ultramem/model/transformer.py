"""Pre-LayerNorm decoder hosting ffn and memory layers (SPEC §1).

Data flow for block i (1-based)::

    x = x + attn(norm1(x))
    h = norm2(x)                          # the "normalised FFN input"
    y = ffn(h)                            # model.ffn (mlp / moe), unless replaced by memory
    for each memory span i:j  ->  out = memory(h), held until block j
    x = x + y + sum(outputs of spans ending at block i)

Memory layers are built from ``model.memory`` through the layer registry; the model never
branches on layer type names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ultramem.config import ModelConfig
from ultramem.layers.base import SparseLayer
from ultramem.layers.registry import ShapeContext
from ultramem.model.attention import Attention, Rotary
from ultramem.model.decode_state import DecodeState
from ultramem.model.placement import Span, parse_placement


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


def norm_params(cfg: ModelConfig, dim: int) -> int:
    return dim if cfg.norm == "rmsnorm" else 2 * dim


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, S, V]
    loss: torch.Tensor | None = None  # LM cross-entropy (mean over tokens)
    aux_loss: torch.Tensor | None = None  # sum of every layer's weighted aux losses
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # "layer.name" -> value
    metrics: dict[str, float] = field(default_factory=dict)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, rotary: Rotary, ffn: SparseLayer | None) -> None:
        super().__init__()
        self.index = index  # 1-based
        self.input_layernorm = make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, rotary, cfg.dropout)
        self.post_attention_layernorm = make_norm(cfg, cfg.d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(cfg.dropout)


class Transformer(nn.Module):
    """Decoder LM. ``forward(idx [B, S], targets [B, S] | None, state: DecodeState | None) -> ModelOutput``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.spans: list[Span] = (
            parse_placement(cfg.memory.placement, cfg.n_layers, cfg.memory) if cfg.memory else []
        )
        replaced = {s.src for s in self.spans} if cfg.memory is not None and getattr(cfg.memory, "replace_ffn", False) else set()
        base_shape = ShapeContext.for_model(cfg, len(self.spans))
        self.blocks = nn.ModuleList(
            Block(cfg, i, self.rotary, None if i in replaced else cfg.ffn.build(ShapeContext.for_model(cfg, len(self.spans), block_index=i)))
            for i in range(1, cfg.n_layers + 1)
        )
        self.memory_shared = cfg.memory.build_shared(base_shape) if cfg.memory else None
        self.memory = nn.ModuleList(
            cfg.memory.build(
                ShapeContext.for_model(cfg, len(self.spans), mem_index=n, block_index=s.src),
                self.memory_shared,
            )
            for n, s in enumerate(self.spans)
        ) if cfg.memory else nn.ModuleList()
        self.norm = make_norm(cfg, cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._reads = {i: [n for n, s in enumerate(self.spans) if s.src == i] for i in range(1, cfg.n_layers + 1)}
        self._writes = {i: [n for n, s in enumerate(self.spans) if s.dst == i] for i in range(1, cfg.n_layers + 1)}

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
        identity; sparse layers by their own ``init_weights`` (SPEC §3.9, §4.5)."""
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
        pending: dict[int, list] = {}
        for block in self.blocks:
            i = block.index
            cache = state.kv[i - 1] if state is not None else None
            x = x + block.drop(block.attn(block.input_layernorm(x), cache, positions, kv_len))
            h = block.post_attention_layernorm(x)
            for n in self._reads[i]:  # launched before the FFN: with overlap they run beside it
                mem = self.memory[n]
                if state is None:
                    pending.setdefault(self.spans[n].dst, []).append(mem(h))
                else:
                    fn = lambda t, mem=mem, st=state.memory[n]: mem(t, st)  # noqa: E731
                    pending.setdefault(self.spans[n].dst, []).append(state.run_memory(fn, h))
            out = block.ffn(h, state.ffn[i - 1] if state is not None else None) if block.ffn is not None else None
            ys = [out] if out is not None else []
            ys += [y if state is None else state.join(y) for y in pending.pop(i, [])]
            for y in ys:
                x = x + block.drop(y)
        if state is not None:
            state.end(s, lengths)
        if last_only:
            last = (lengths - 1 if lengths is not None else torch.full_like(idx[:, 0], s - 1)).clamp_min(0)
            x = x.gather(1, last.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))
        x = self.norm(x)
        logits = F.linear(x, self.lm_head.weight if self.lm_head is not None else self.embed_tokens.weight)
        return self._output(logits, targets)

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
        """Parameters as the accounting counts them (SPEC §1: no embeddings, no LM head)."""
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


def init_std_default(d_model: int) -> float:
    """sqrt(2 / (5 D)) (small-init, used by the V2 configs)."""
    return math.sqrt(2.0 / (5.0 * d_model))
