"""Training memory per rank on a ``(mp, dp)`` mesh, from a config (docs/distributed.md §6).

Value tables are the parameters the sparse layers hint as their own optimiser groups
(``param_group_hints``: UltraMem values, the V2 pool's values and pre-values); they are split
over ``mp`` and replicated over ``dp``. Every other parameter (embeddings and LM head included)
is FSDP-sharded over ``dp`` and replicated over ``mp``. Per parameter a rank holds the fp32
weight, its fp32 gradient and AdamW's two fp32 moments: 16 bytes. Not counted: activations,
the transient unsharded block FSDP all-gathers for compute, and communication buffers.

    python -m ultramem.distributed.memory     # writes docs/results/distributed-memory.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ultramem.config import ModelConfig
from ultramem.distributed.volume import LookupShape, choose_partition, columnwise_bytes, rowwise_bytes
from ultramem.model.transformer import Transformer
from ultramem.presets import get_preset
from ultramem.train.optim import collect_hints

BYTES_PER_PARAM = 16  # fp32 weight + fp32 grad + AdamW exp_avg + exp_avg_sq


@dataclass(frozen=True)
class Split:
    table_params: int
    dense_params: int  # everything else, embeddings and LM head included


def split_params(cfg: ModelConfig) -> Split:
    """Table vs dense parameter counts of ``cfg`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    tables = {id(p): p.numel() for h in collect_hints(model) for p in h.params}
    total = sum(p.numel() for p in model.parameters())  # unique parameters
    return Split(sum(tables.values()), total - sum(tables.values()))


def gib_per_rank(split: Split, mp: int, dp: int) -> dict[str, float]:
    gib = 2**30
    table = split.table_params / mp * BYTES_PER_PARAM / gib
    dense = split.dense_params / dp * BYTES_PER_PARAM / gib
    return {"tables_gib": round(table, 2), "dense_gib": round(dense, 2), "total_gib": round(table + dense, 2)}


def v2_120b() -> ModelConfig:
    """A 120B-total UltraMemV2 for sizing only: the V2 paper's 2.5B/120B model is proprietary and
    its shape is not published, so this takes the 1B/7B preset and grows the pool (knum 528 ->
    2,528: 16 x 2,528^2 rows x (768 + 384) ~ 117.8B pool parameters)."""
    cfg = get_preset("ultramem-v2-1b-7b").model
    cfg.memory.knum = 2528
    return cfg


def lookup_bytes(models: dict[str, ModelConfig]) -> list[dict]:
    """Bytes one rank sends per token and memory layer (forward + backward, bf16 tables,
    uniform rows), row- vs column-wise, from :mod:`ultramem.distributed.volume`."""
    out = []
    for name, cfg in models.items():
        mem = cfg.memory
        shape = cfg.wiring().shared
        s = LookupShape(tokens=1, selections=mem.heads * mem.topk, cores=mem.cores if mem.tucker_rank else 1,
                        blocks=1, value_dim=mem.dv(shape), pre_value_dim=mem.dp(shape), value_bytes=2)
        for mp in (8, 64):
            out.append({"model": name, "mp": mp, "row_bytes": sum(rowwise_bytes(s, mp).values()),
                        "col_bytes": sum(columnwise_bytes(s, mp).values()), "auto": choose_partition([s], mp)})
    return out


def main(out: Path = Path("docs/results/distributed-memory.json")) -> dict:
    models = {"ultramem-v2-1b-7b": get_preset("ultramem-v2-1b-7b").model, "ultramem-v2-120b (sized)": v2_120b()}
    meshes = [(1, 8), (8, 1), (8, 8), (16, 4), (64, 1), (64, 8)]  # (mp, dp)
    rows = []
    for name, cfg in models.items():
        s = split_params(cfg)
        for mp, dp in meshes:
            rows.append({"model": name, "table_params": s.table_params, "dense_params": s.dense_params,
                         "mp": mp, "dp": dp, **gib_per_rank(s, mp, dp)})
    doc = {"device": "none (computed from the configs)", "command": "python -m ultramem.distributed.memory",
           "bytes_per_param": BYTES_PER_PARAM, "rows": rows, "lookup_bytes_per_token": lookup_bytes(models)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    for r in rows:
        print(f"| {r['model']} | {r['table_params'] / 1e9:.2f} | {r['dense_params'] / 1e9:.2f} | {r['mp']} x {r['dp']} "
              f"| {r['tables_gib']} | {r['dense_gib']} | {r['total_gib']} |")
    for r in doc["lookup_bytes_per_token"]:
        print(f"| {r['model']} | {r['mp']} | {r['row_bytes']:,.0f} | {r['col_bytes']:,.0f} | {r['auto']} |")
    return doc


if __name__ == "__main__":
    main()
