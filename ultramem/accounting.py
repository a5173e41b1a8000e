"""Parameters, active parameters and FLOPs per token from a config, without building weights.

Rules (math.md §1): parameters exclude token embeddings and the LM head; FLOPs per token are
2 x the multiply-accumulates of one token's forward pass, excluding attention scores
(``QK^T``, ``AV``) and embeddings/LM head. Norm parameters are counted (so the built model's
count equals this one exactly) but norms cost no FLOPs here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ultramem.config import ModelConfig


@dataclass(frozen=True)
class Counts:
    params: int
    active_params: int
    flops_per_token: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _norm(cfg: ModelConfig) -> int:
    return cfg.d_model if cfg.norm == "rmsnorm" else 2 * cfg.d_model


def attention_params(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    return d * cfg.n_heads * hd * 2 + 2 * d * cfg.kv_heads * hd  # q, o + k, v


def count(cfg: ModelConfig) -> Counts:
    """Counts of a model config (validated first)."""
    cfg.validate()
    plan = cfg.wiring()  # the model is built from the same plan
    attn = attention_params(cfg)
    params = active = cfg.n_layers * (attn + 2 * _norm(cfg)) + _norm(cfg)
    flops = cfg.n_layers * 2 * attn
    for shape in plan.ffn:
        if shape is None:  # replaced by its memory layer
            continue
        params += cfg.ffn.num_params(shape)
        active += cfg.ffn.active_params(shape)
        flops += cfg.ffn.flops_per_token(shape)
    if cfg.memory is not None:
        params += cfg.memory.shared_num_params(plan.shared)
        for shape in plan.memory:
            params += cfg.memory.num_params(shape)
            active += cfg.memory.active_params(shape)
            flops += cfg.memory.flops_per_token(shape)
    return Counts(params, active, flops)


def embedding_params(cfg: ModelConfig) -> int:
    """Token embedding (+ untied LM head) parameters, reported separately."""
    return cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
