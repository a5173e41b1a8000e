"""Baseline presets: UltraMem Table 6 (dense, MoE, PKM), UltraMemV2 Table 10 (OLMoE rows) and
``tiny-*`` CPU presets. Published figures are in math.md §6; ``tests/presets/test_registry.py`` checks them.
"""

from __future__ import annotations

from ultramem.config import Config, DataConfig, ModelConfig, TrainConfig
from ultramem.layers.memory_plus import MemoryPlusConfig
from ultramem.layers.mlp import MLPConfig
from ultramem.layers.moe import MoEConfig
from ultramem.layers.pkm import PKMConfig
from ultramem.presets.registry import Published, register_preset

TABLE6 = "UltraMem (ICLR 2025) Table 6"
TABLE10 = "UltraMemV2 (2025) Table 10"
# Paper LR per dense size (math.md §6).
LR = {151: 6e-4, 680: 2.5e-4, 1600: 2e-4, 6500: 1.2e-4}
# (D, MLP inner, heads, blocks) of the four dense sizes.
DENSE = {151: (1024, 4096, 16, 12), 680: (1536, 6144, 16, 24), 1600: (2048, 8192, 16, 32), 6500: (4096, 16384, 32, 32)}
NAMES = {151: "151m", 680: "680m", 1600: "1.6b", 6500: "6.5b"}


def paper_model(size: int, **kw) -> ModelConfig:
    """The UltraMem paper's host transformer at a dense size: GELU MLP, vocab 50,432,
    dropout 0.1 (math.md §6)."""
    d, inner, heads, blocks = DENSE[size]
    base = dict(vocab_size=50432, d_model=d, n_layers=blocks, n_heads=heads, dropout=0.1,
                max_seq_len=2048, ffn=MLPConfig(hidden=inner))
    base.update(kw)
    return ModelConfig(**base)


def paper_train(size: int) -> TrainConfig:
    return TrainConfig(lr=LR[size], batch_size=2048, grad_accum=1)


def paper_config(size: int, **model_kw) -> Config:
    return Config(model=paper_model(size, **model_kw), train=paper_train(size), data=DataConfig(seq_len=2048))


def _register_dense(size: int, params: float, gflops: float) -> None:
    register_preset(f"dense-{NAMES[size]}", f"Dense-{NAMES[size].upper()} host transformer",
                    Published(params, gflops, source=TABLE6), ("paper", "dense"))(lambda: paper_config(size))


_register_dense(151, 0.15e9, 0.30)
_register_dense(680, 0.68e9, 1.36)
_register_dense(1600, 1.61e9, 3.21)
_register_dense(6500, 6.44e9, 12.88)


def _register_moe(size: int, hidden: int, n_experts: int, params: float, gflops: float) -> None:
    name = f"moe-{NAMES[size]}-2in{n_experts}"
    desc = f"MoE-{NAMES[size].upper()}-2in{n_experts}: top-2 of {n_experts} GELU experts of width {hidden}"
    register_preset(name, desc, Published(params, gflops, source=TABLE6), ("paper", "moe"))(
        lambda: paper_config(size, ffn=MoEConfig(n_experts=n_experts, top_k=2, hidden=hidden))
    )


_register_moe(151, 2528, 32, 2.04e9, 0.35)
_register_moe(680, 3584, 33, 8.95e9, 1.50)
_register_moe(1600, 4672, 34, 21.36e9, 3.52)


def _register_pkm(size: int, m: int, heads: int, key_dim: int, n_keys: int, block: int,
                  params: float, gflops: float, note: str = "", gflops_tolerance: float = 0.05) -> None:
    name = f"pkm-{NAMES[size]}-x12"
    desc = f"PKM-{NAMES[size].upper()}-x12: one {n_keys}^2-value memory ({heads} heads x top-{m}) parallel to block {block}'s MLP"
    register_preset(name, desc, Published(params, gflops, source=TABLE6, convention=note, gflops_tolerance=gflops_tolerance),
                    ("paper", "pkm"))(
        lambda: paper_config(size, memory=PKMConfig(
            placement=f"{block}:{block}", n_keys=n_keys, key_dim=key_dim, heads=heads, topk=m))
    )


# Table 6 prints 0.35 GFLOPs for PKM-151M, but its own row (6 heads, K 512, 1347 keys, top-16,
# D_v = D) costs 0.331 under math.md §1's rules, as every other row's does (dense 0.302 + query
# 0.0126 + key scores 0.0166 + values 0.0002); the paper's Table 3 puts its PKM-151M ablation
# baseline at 0.324. We keep the row's architecture and accept 6 % on this one figure.
_register_pkm(151, 16, 6, 512, 1347, 6, 2.04e9, 0.35, gflops_tolerance=0.06,
              note="Table 6's 0.35 GFLOPs is not reachable from the row's own sizes (0.331 by math.md §1; "
                   "Table 3's PKM-151M baseline: 0.324); tolerance 6 % on GFLOPs")
_register_pkm(680, 35, 8, 768, 2308, 12, 8.95e9, 1.50)
# math.md §6 inconsistency (1): the row's Knum 1792 gives only 6.6B values; its 21.44B parameters
# imply Knum ~ 3112. We reproduce the parameter count (and hence the FLOPs) with Knum = 3112.
_register_pkm(1600, 42, 12, 896, 3112, 16, 21.44e9, 3.52,
              note="Table 6 prints Knum=1792, but its 21.44B params imply Knum~3112 (math.md §6); we use 3112")


# ---- UltraMemV2 Table 10 OLMoE rows ----------------------------------------------------------
V2_CONVENTION_227M = (
    "total params exclude embeddings (math.md §1); V2 Table 10's 227M active fits only with the "
    "tied input embedding counted, so active is compared with it added (math.md §6)"
)


def olmoe_model(d: int, blocks: int, heads: int, hidden: int, tie: bool, **kw) -> ModelConfig:
    """OLMoE-style host (V2's open-source setting): SwiGLU experts, RMSNorm, vocab 50,304."""
    base = dict(vocab_size=50304, d_model=d, n_layers=blocks, n_heads=heads, norm="rmsnorm",
                tie_embeddings=tie, max_seq_len=4096, init_std=(2 / (5 * d)) ** 0.5,
                ffn=MoEConfig(n_experts=64, top_k=8, hidden=hidden, activation="swiglu"))
    base.update(kw)
    return ModelConfig(**base)


@register_preset("olmoe-227m-1.2b", "OLMoE-227M/1.2B: 8 of 64 SwiGLU experts (width 384), D 768, 20 blocks",
                 Published(1.18e9, None, 227e6, TABLE10, V2_CONVENTION_227M, embedding_in_active=True,
                           params_tolerance=0.05), ("paper", "moe", "v2"))
def olmoe_227m() -> Config:
    return Config(model=olmoe_model(768, 20, 12, 384, tie=True), train=TrainConfig(lr=4e-4, batch_size=768),
                  data=DataConfig(seq_len=4096))


@register_preset("olmoe-1b-7b", "OLMoE-1B/7B: 8 of 64 SwiGLU experts (width 1024), D 2048, 16 blocks",
                 Published(6.71e9, None, 1070e6, TABLE10, "embeddings and LM head excluded (math.md §6)",
                           params_tolerance=0.05),
                 ("paper", "moe", "v2"))
def olmoe_1b_7b() -> Config:
    return Config(model=olmoe_model(2048, 16, 16, 1024, tie=False), train=TrainConfig(lr=4e-4, batch_size=1024),
                  data=DataConfig(seq_len=4096))


# ---- tiny CPU presets (<= 5M params without embeddings) --------------------------------------
TINY_VOCAB = 8192  # the bundled byte-level BPE tokenizer's vocabulary


def tiny_model(**kw) -> ModelConfig:
    base = dict(vocab_size=TINY_VOCAB, d_model=128, n_layers=4, n_heads=4, max_seq_len=256,
                ffn=MLPConfig(hidden=512))
    base.update(kw)
    return ModelConfig(**base)


def tiny_config(**model_kw) -> Config:
    return Config(model=tiny_model(**model_kw),
                  train=TrainConfig(lr=3e-3, batch_size=16, max_steps=300, warmup_frac=0.05, eval_every=100,
                                    ckpt_every=100, log_every=10),
                  data=DataConfig(seq_len=128))


register_preset("tiny-dense", "tiny dense transformer for CPU runs and tests", tags=("tiny", "dense"))(tiny_config)
register_preset("tiny-moe", "tiny top-2-of-8 MoE for CPU runs and tests", tags=("tiny", "moe"))(
    lambda: tiny_config(ffn=MoEConfig(n_experts=8, top_k=2, hidden=256))
)
register_preset("tiny-pkm", "tiny PKM (64^2 values, parallel to block 2's MLP) for CPU", tags=("tiny", "pkm"))(
    lambda: tiny_config(memory=PKMConfig(placement="2:2", n_keys=64, key_dim=64, heads=2, topk=8))
)
register_preset("tiny-memory-plus", "tiny Memory+ (shared 64^2-value table, 2 layers) for CPU", tags=("tiny", "memory_plus"))(
    lambda: tiny_config(memory=MemoryPlusConfig(placement="2:2/3:3", n_keys=64, key_dim=64, heads=2, topk=8))
)


# ---- dense models of the OLMoE families' active FLOPs (decode benchmark baselines) -----------
def _dense_like(d: int, blocks: int, heads: int, hidden: int, tie: bool) -> ModelConfig:
    """The OLMoE host with one dense SwiGLU MLP whose width matches the family's active FLOPs."""
    return olmoe_model(d, blocks, heads, 0, tie, ffn=MLPConfig(hidden=hidden, activation="swiglu",
                                                                init_std=(2 / (5 * d)) ** 0.5))


@register_preset("dense-227m", "Dense host of the 227M/1.2B family: SwiGLU width 3096 = OLMoE-227M's active FLOPs",
                 tags=("dense", "v2"))
def dense_227m() -> Config:
    return Config(model=_dense_like(768, 20, 12, 3096, tie=True), train=TrainConfig(lr=4e-4, batch_size=768),
                  data=DataConfig(seq_len=4096))


@register_preset("dense-1b", "Dense host of the 1B/7B family: SwiGLU width 8216 = OLMoE-1B/7B's active FLOPs",
                 tags=("dense", "v2"))
def dense_1b() -> Config:
    return Config(model=_dense_like(2048, 16, 16, 8216, tie=False), train=TrainConfig(lr=4e-4, batch_size=1024),
                  data=DataConfig(seq_len=4096))
