"""The model card (``README.md``) of an exported model: what it is, how big, how it was trained."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ultramem.accounting import count, embedding_params
from ultramem.config import Config


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def run_results(run_dir: Path) -> dict[str, Any]:
    """``summary.json`` of the run, else the last validation row of ``metrics.jsonl``."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        vals = [r for r in rows if "val_loss" in r]
        return vals[-1] if vals else {}
    return {}


def _data_sources(path: str) -> list[str]:
    index = Path(path) / "index.json"
    if not index.is_file():
        return []
    try:
        return [str(s) for s in json.loads(index.read_text()).get("sources", [])]
    except json.JSONDecodeError:
        return []


def model_card(cfg: Config, run_dir: Path, step: int, dtype: str, repo_name: str) -> str:
    m, t = cfg.model, cfg.train
    c = count(m)
    res = run_results(run_dir)
    layer = m.memory.type if m.memory is not None else m.ffn.type
    val = res.get("val_loss")
    sources = _data_sources(cfg.data.path)
    rows = [
        ("layer type", f"`{layer}`" + (f" at `{m.memory.placement}`" if m.memory is not None else "")),
        ("blocks x width", f"{m.n_layers} x {m.d_model} ({m.n_heads} heads)"),
        ("vocabulary / context", f"{m.vocab_size} / {m.max_seq_len}"),
        ("parameters (no embeddings)", _fmt(c.params)),
        ("active parameters per token", _fmt(c.active_params)),
        ("embedding parameters", _fmt(embedding_params(m))),
        ("forward FLOPs per token", f"{c.flops_per_token / 1e6:.2f} M"),
        ("weights dtype", dtype),
        ("training steps", f"{step} of {t.max_steps}"),
        ("batch", f"{t.batch_size} x {cfg.data.seq_len} tokens x {t.grad_accum} accumulation"),
        ("optimiser", f"AdamW lr {t.lr} (cosine to {t.min_lr_ratio}x, warmup {t.warmup_frac}), "
                      f"betas {t.beta1}/{t.beta2}, weight decay {t.weight_decay}"),
        ("tokens seen", _fmt(res["tokens_seen"]) if "tokens_seen" in res else "not recorded"),
        ("trained on", f"{res.get('device', 'not recorded')}"
                       + (f", {res['world_size']} process(es)" if "world_size" in res else "")),
        ("data", f"`{cfg.data.path}`" + (f" ({', '.join(sources)})" if sources else "")),
        ("validation loss", f"{val:.4f} nats/token" if isinstance(val, (int, float)) else "not recorded"),
    ]
    if isinstance(res.get("val_bpb"), (int, float)):
        rows.append(("validation bits per byte", f"{res['val_bpb']:.4f}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    config = json.dumps(cfg.to_dict()["model"], indent=2)
    return f"""---
library_name: transformers
license: apache-2.0
tags: [ultramem, memory-layer, {layer}]
---

# {repo_name}

A language model with `{layer}` layers, trained with [ultramem](https://pypi.org/project/ultramem/)
and exported with `ultramem export`. Parameters, active parameters and FLOPs follow ultramem's
accounting (no embeddings; FLOPs = 2 x multiply-accumulates of one token's forward pass).

| | |
|---|---|
{table}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{repo_name}")
model = AutoModelForCausalLM.from_pretrained("{repo_name}", trust_remote_code=True)
ids = tok("Fellow-Citizens of the Senate", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))
```

The directory carries its own code: without ultramem installed it runs ultramem's plain-PyTorch
reference ops (`um_*.py`); with ultramem {{same version}} installed, ultramem itself (Triton
kernels on GPU). With `import ultramem` first, `trust_remote_code` is not needed.
Limits: no left padding, no beam search, one token per decode step after the prompt.

## Model config

```json
{config}
```
""".replace("{same version}", "of the same version")
