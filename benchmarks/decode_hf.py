"""What users run instead: Hugging Face ``generate()`` on a Llama of dense-1.6b's shape (random
weights from a config, bf16), batch 1, greedy; one JSON line per cache setting on stdout.
Run by ``benchmarks/decode.py`` in a subprocess under a time limit (its static cache may
compile the forward first)."""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main(new: int = 128) -> None:
    # SwiGLU width 5504 gives ~ dense-1.6b's 1.61B parameters (its GELU MLP is 4 D wide).
    cfg = LlamaConfig(vocab_size=50432, hidden_size=2048, intermediate_size=5504, num_hidden_layers=32,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 50000, (1, 32), device="cuda")
    settings = [("HF generate, static cache", {"cache_implementation": "static"}, new),
                ("HF generate, default (dynamic) cache", {}, 32)]
    for label, kw, n in settings:
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, **kw)  # warm-up / compile
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
        torch.cuda.synchronize()
        tps = (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t)
        print(json.dumps({"model": "llama (dense-1.6b shape)", "batch": 1, "engine": label,
                          "tokens_per_s": round(tps, 1), "warmup_s": round(warm, 1),
                          "transformers": __import__("transformers").__version__}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 128)
