"""Whole-model training throughput: tokens/s of fwd + bwd + fused AdamW under bf16 autocast,
8 x 2048 tokens a step, the same script for every preset (fp32 master weights, eager).

    PYTHONPATH=. python3 benchmarks/train_throughput.py dense-151m moe-151m-2in32 ...

``benchmarks/moe.py`` calls :func:`train_rows` in its own process; this file alone prints the
table. Extra configs that are not presets: ``dense-227m-swiglu3072`` (olmoe-227m-1.2b's host
with a dense SwiGLU FFN of width 8 x 384 = 3,072: the same active FLOPs, less 1.4 % router)
and ``hf-olmoe-227m-1.2b`` (Hugging Face transformers' OlmoeForCausalLM at that shape).
"""

from __future__ import annotations

import argparse
import time

import torch

from ultramem.layers.mlp import MLPConfig
from ultramem.model.transformer import Transformer
from ultramem.presets import get_preset

DEV = "cuda"
BATCH, SEQ = 8, 2048


def model_config(name: str):
    if name == "dense-227m-swiglu3072":
        cfg = get_preset("olmoe-227m-1.2b").model
        cfg.ffn = MLPConfig(hidden=3072, activation="swiglu", init_std=cfg.init_std)
        return cfg
    return get_preset(name).model


def hf_olmoe(cfg, experts_impl: str) -> torch.nn.Module:
    """transformers' OlmoeForCausalLM with ``cfg``'s shape (random weights, SDPA attention)."""
    from transformers import OlmoeConfig, OlmoeForCausalLM  # noqa: PLC0415

    moe = cfg.ffn
    hc = OlmoeConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=moe.hidden,
                     num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.kv_heads, num_experts=moe.n_experts,
                     num_experts_per_tok=moe.top_k, norm_topk_prob=moe.normalize_top_k,
                     max_position_embeddings=max(cfg.max_seq_len, SEQ), tie_word_embeddings=cfg.tie_embeddings,
                     router_aux_loss_coef=moe.balance_weight, output_router_logits=True,
                     attn_implementation="sdpa", experts_implementation=experts_impl)
    return OlmoeForCausalLM(hc).to(DEV)


def _time_steps(step, warmup: int, steps: int) -> float:
    """Median ms of ``step()`` over ``steps`` calls after ``warmup`` (CUDA events)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def train_step_fn(model: torch.nn.Module, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    vocab = model.config.vocab_size if hf else model.cfg.vocab_size
    idx = torch.randint(0, vocab, (BATCH, SEQ), device=DEV)
    tgt = torch.randint(0, vocab, (BATCH, SEQ), device=DEV)

    def step() -> None:
        with torch.autocast(DEV, torch.bfloat16):
            if hf:
                loss = model(input_ids=idx, labels=idx).loss  # shifts labels inside
            else:
                out = model(idx, tgt)
                loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_rows(names: list[str], warmup: int = 3, steps: int = 8, deadline: float | None = None) -> list[dict]:
    rows = []
    for name in names:
        if deadline is not None and time.time() > deadline:
            print(f"train {name}: skipped (time)", flush=True)
            continue
        try:
            hf = name.startswith("hf-")
            cfg = model_config(name[3:] if hf else name)
            if hf:
                model = hf_olmoe(cfg, "grouped_mm")
            else:
                model = Transformer.build(cfg, device=DEV)
            model.train()
            ms = _time_steps(train_step_fn(model, hf), warmup, steps)
            row = {"bench": "train_model", "impl": "transformers" if hf else "ultramem", "preset": name,
                   "batch": BATCH, "seq": SEQ, "ms": ms, "tokens_per_s": BATCH * SEQ / ms * 1e3, "graph": False}
            if hf:
                row["variant"] = "experts_implementation=grouped_mm"
            rows.append(row)
            print(row, flush=True)
        except Exception as err:  # one preset failing must not lose the others' rows
            print(f"train {name}: FAILED {type(err).__name__}: {err}", flush=True)
            rows.append({"bench": "train_model", "preset": name, "error": f"{type(err).__name__}: {err}"[:300]})
        finally:
            model = None
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("presets", nargs="+")
    args = ap.parse_args()
    for row in train_rows(args.presets):
        print(row)


if __name__ == "__main__":
    main()
