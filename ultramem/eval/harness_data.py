"""The data of ultramem's local lm-evaluation-harness tasks (committed under
``ultramem/assets/harness/``; regenerate with the command below, deterministic).

    python -m ultramem.eval.harness_data

- ``ultramem_corpus_recall``: memory of the training text. A sentence of the bundled corpus
  slice (part of the default training corpus) is cut at 60 % of its words; the model picks the
  true continuation among it and the endings of three other sentences. A model that has
  stored its training text in parameters (what memory layers are for) scores above chance (25 %).
- ``ultramem_kv_recall``: in-context key-value recall. Eight "the code of WORD is NUMBER." facts,
  then one queried; the choices are four of the numbers listed. Chance is 25 %.
"""

from __future__ import annotations

import json
import random
import re
from importlib import resources
from pathlib import Path

DOCS = 200
WORDS = ("apple river stone cloud tiger lamp window garden silver engine harbor violin "
         "candle forest mirror rocket meadow castle pepper anchor").split()


def asset_dir() -> Path:
    return Path(str(resources.files("ultramem") / "assets" / "harness"))


def corpus_recall(text: str, n: int = DOCS, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 12 <= len(s.split()) <= 40]
    picked = rng.sample(range(len(sentences)), n)
    docs = []
    for i in picked:
        words = sentences[i].split()
        cut = int(0.6 * len(words))
        others = rng.sample([j for j in range(len(sentences)) if j != i], 3)
        endings = [" " + " ".join(words[cut:])]
        for j in others:
            w = sentences[j].split()
            endings.append(" " + " ".join(w[int(0.6 * len(w)):]))
        order = list(range(4))
        rng.shuffle(order)
        docs.append({"context": " ".join(words[:cut]), "choices": [endings[k] for k in order],
                     "gold": order.index(0)})
    return docs


def kv_recall(n: int = DOCS, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        keys = rng.sample(WORDS, 8)
        values = [str(rng.randint(1000, 9999)) for _ in keys]
        q = rng.randrange(8)
        facts = " ".join(f"The code of {k} is {v}." for k, v in zip(keys, values))
        distract = rng.sample([v for i, v in enumerate(values) if i != q], 3)
        choices = [values[q], *distract]
        rng.shuffle(choices)
        docs.append({"context": f"{facts} The code of {keys[q]} is", "choices": [" " + c for c in choices],
                     "gold": choices.index(values[q])})
    return docs


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "assets" / "harness"
    text = (out.parent / "corpus_slice.txt").read_text(encoding="utf-8")
    for name, docs in (("ultramem_corpus_recall", corpus_recall(text)), ("ultramem_kv_recall", kv_recall())):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        print(f"{out / name}.jsonl: {len(docs)} documents")


if __name__ == "__main__":
    main()
