"""What users run instead: Hugging Face ``generate()`` on a Llama of dense-1.6b's shape (random
weights from a config, bf16), batch 1, greedy; one JSON line per cache setting on stdout.
Run by ``benchmarks/decode.py`` in a subprocess under a time limit (its static cache compiles
the forward first). The measurement is ``decode_parts.hf_generate``, shared with the sweeps."""

from __future__ import annotations

import json
import sys
import time

import decode_parts as parts


def main(new: int = 128, budget_s: float = 600) -> None:
    settings = [("HF generate, static cache", {"cache_implementation": "static"}, new),
                ("HF generate, default (dynamic) cache", {}, 32)]
    end = time.time() + budget_s
    for row in parts.hf_generate(settings, lambda: end - time.time()):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 128)
