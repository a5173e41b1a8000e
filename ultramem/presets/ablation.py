"""The UltraMem Table 2 ablation ladder at one CPU-trainable size (D 256, 8 blocks).

Each rung adds one item to the previous rung, in the paper's order; ``ablation-00-pkm`` is the
``ultramem`` layer with every switch off, which computes exactly what the ``pkm`` layer computes
(BatchNorm query, softmax, D_v = D, constant value LR 1e-3; tested in
``tests/layers/test_ultramem.py``). Rerun the ablation one command per rung, e.g.
``ultramem train --preset ablation-07-tdqkr``.

Sizes keep the value parameters roughly fixed along the ladder, as the paper does: halving D_v
doubles the rows (knum x sqrt 2) and m; splitting into 3 layers divides the rows by 3.
Value-LR handling stays PKM's (1e-3 constant) until rung 10 replaces it with x10 -> x1 decay.
"""

from __future__ import annotations

import dataclasses

from ultramem.config import Config, DataConfig, ModelConfig, TrainConfig
from ultramem.layers.mlp import MLPConfig
from ultramem.layers.ultramem import UltraMemConfig
from ultramem.presets.registry import register_preset

D, BLOCKS = 256, 8

PKM_BASE = UltraMemConfig(
    placement="4:4", knum=128, expansion=1, key_dim=64, heads=2, topk=16, k=0, value_dim=0,
    softmax=True, share_query=False, query_norm="batchnorm", key_norm="none", tucker_rank=0,
    per_rank_query=False, cores=1, aux_alpha=0.0, init="pkm", value_lr=1e-3, value_lr_constant=True,
    value_lr_mult=1.0, query_conv=0,
)

# (suffix, what the rung adds, changes on top of the previous rung) -- Table 2 order
LADDER: list[tuple[str, str, dict]] = [
    ("pkm", "PKM parallel to the MLP of block 4 (every UltraMem switch off)", {}),
    ("rm-softmax", "raw selected scores as weights (§3.1)", dict(softmax=False)),
    ("half-vdim-proj", "D_v = D/2 + output projection, 2x values and 2x top-m (§3.2)",
     dict(value_dim=D // 2, knum=181, topk=32)),
    ("share-query", "the 2 heads share one query (§3.3)", dict(share_query=True)),
    ("split-skip", "3 smaller layers 2:3/4:5/6:7, values / 3 (§3.4)", dict(placement="2:3/4:5/6:7", knum=104)),
    ("qk-norm", "LayerNorm on queries and keys (§3.5)", dict(query_norm="layernorm", key_norm="layernorm")),
    ("ive", "implicit value expansion E = 4 (§3.6)", dict(expansion=4)),
    ("tdqkr", "Tucker retrieval r = 2, aux loss 0.001 / 0.15 (§3.7)", dict(tucker_rank=2, aux_alpha=0.001, aux_tau=0.15)),
    ("mcs", "multi-core scoring h_c = 2 (§3.8)", dict(cores=2)),
    ("improved-init", "Appendix-A initialisation (§3.9)", dict(init="improved")),
    ("value-lr-decay", "value LR x10 decaying linearly to x1 (§3.10)",
     dict(value_lr=0.0, value_lr_constant=False, value_lr_mult=10.0, value_lr_decay_frac=1.0)),
    ("query-conv", "causal depthwise query conv, kernel 4 (§3.11)", dict(query_conv=4)),
]


def rung_memory(index: int) -> UltraMemConfig:
    """The memory config of rung ``index`` (all changes up to and including it)."""
    cfg = PKM_BASE
    for _, _, changes in LADDER[: index + 1]:
        cfg = dataclasses.replace(cfg, **changes)
    return cfg


def rung_config(index: int) -> Config:
    model = ModelConfig(vocab_size=8192, d_model=D, n_layers=BLOCKS, n_heads=4, max_seq_len=512,
                        ffn=MLPConfig(hidden=4 * D), memory=rung_memory(index))
    train = TrainConfig(lr=1e-3, batch_size=16, max_steps=2000, warmup_frac=0.02, eval_every=200, ckpt_every=500)
    return Config(model=model, train=train, data=DataConfig(seq_len=256))


def rung_name(index: int) -> str:
    return f"ablation-{index:02d}-{LADDER[index][0]}"


def _register(index: int) -> None:
    register_preset(rung_name(index), f"Table 2 ablation rung {index}: + {LADDER[index][1]}",
                    tags=("ablation", "ultramem"))(lambda: rung_config(index))


for _i in range(len(LADDER)):
    _register(_i)
