"""Synthetic probes of issue 13, generated offline from a seed, and their scoring.

Each probe is a list of :class:`Item` ``(prompt, answer)``; an item is correct when the model's
greedy next token matches every answer token given the prompt and the answer's earlier tokens
(teacher-forced exact match: one forward per item, no sampling). Accuracy comes with a Wilson
95 % interval (:func:`wilson_ci`).

- ``biographies``: invented people with several attributes, stated in a few paraphrases
  (:func:`biography_corpus` is the text to mix into training); the probe asks one attribute.
- ``kv_retrieval``: in-context key-value pairs, then a query for one key (multi-query
  associative recall).
- ``multi_round``: a fact stated early, distractor sentences, then the question.
- ``icl``: a new rule (word -> word + suffix) from a few examples, applied to a new word.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

FIRST = ["Alda", "Boris", "Cyra", "Dmitri", "Elin", "Farid", "Greta", "Hugo", "Ines", "Jonas",
         "Kira", "Lorenz", "Mara", "Nils", "Oona", "Pavel", "Quinn", "Rosa", "Stellan", "Tilde"]
LAST = ["Ambrose", "Brandt", "Castell", "Dunmore", "Ekholm", "Falk", "Grieve", "Holm", "Ivers",
        "Jarl", "Kessler", "Lund", "Morrow", "Norberg", "Oakes", "Pryce", "Quist", "Rook"]
CITIES = ["Arbela", "Brisk", "Corvin", "Dornach", "Elsing", "Fenwick", "Galt", "Hollin", "Istra", "Jorvik"]
JOBS = ["baker", "pilot", "chemist", "sculptor", "surveyor", "violinist", "glazier", "archivist"]
COLOURS = ["amber", "cobalt", "crimson", "ivory", "jade", "ochre", "slate", "violet"]
SUFFIXES = ["zu", "vik", "ola", "esh", "tam", "rin"]
WORDS = ["apple", "river", "stone", "cloud", "lamp", "seed", "bell", "rope", "coin", "leaf", "door", "wolf"]


@dataclass(frozen=True)
class Item:
    prompt: str
    answer: str  # starts with a space: it is scored as the prompt's continuation


def _people(n: int, rng: random.Random) -> list[dict[str, str]]:
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    rng.shuffle(names)
    if n > len(names):
        raise ValueError(f"at most {len(names)} distinct people, asked for {n}")
    return [{"name": nm, "city": rng.choice(CITIES), "job": rng.choice(JOBS), "colour": rng.choice(COLOURS),
             "year": str(rng.randint(1900, 1999))} for nm in names[:n]]


BIO_TEMPLATES = [
    "{name} was born in {year} in {city}. {name} worked as a {job}. {name}'s favourite colour was {colour}.",
    "Born in {city} in {year}, {name} became a {job} and liked the colour {colour}.",
    "{name}, a {job} from {city}, was born in {year}; the colour {name} loved most was {colour}.",
]
BIO_QUESTIONS = {"city": "{name} was born in the city of", "job": "By profession, {name} was a",
                 "year": "{name} was born in the year", "colour": "The favourite colour of {name} was"}


def biography_corpus(n_people: int, seed: int = 0, paraphrases: int = 3) -> list[str]:
    """One document per person: ``paraphrases`` templated statements of every attribute."""
    rng = random.Random(seed)
    return [" ".join(t.format(**p) for t in BIO_TEMPLATES[:paraphrases]) for p in _people(n_people, rng)]


def biographies(n_people: int, seed: int = 0) -> list[Item]:
    """One question per person and attribute, for the people of :func:`biography_corpus`."""
    people = _people(n_people, random.Random(seed))
    return [Item(BIO_QUESTIONS[k].format(**p), " " + p[k]) for p in people for k in BIO_QUESTIONS]


# Prompts cut from BIO_TEMPLATES[0] just before an attribute: recall in the training phrasing.
BIO_RECALL = {"year": "{name} was born in", "city": "{name} was born in {year} in",
              "job": "{name} was born in {year} in {city}. {name} worked as a",
              "colour": "{name}'s favourite colour was"}
# log2 of the number of values each attribute is drawn from (uniformly): bits per correct answer.
BIO_BITS = {"year": math.log2(100), "city": math.log2(len(CITIES)), "job": math.log2(len(JOBS)),
            "colour": math.log2(len(COLOURS))}


def biography_recall(n_people: int, seed: int = 0) -> list[Item]:
    """One item per person and attribute, prompted with the first paraphrase's own words (what
    a model that stored the fact completes); :func:`biographies` asks the same in question form."""
    people = _people(n_people, random.Random(seed))
    return [Item(BIO_RECALL[k].format(**p), " " + p[k]) for p in people for k in BIO_RECALL]


def knowledge_bits(items: list[Item], correct: list[bool]) -> float:
    """Bits stored, counting ``log2(#values)`` for each correctly recalled attribute of
    :func:`biography_recall` (no chance correction: an upper estimate at low accuracy)."""
    keys = list(BIO_RECALL) * (len(items) // len(BIO_RECALL))
    return sum(BIO_BITS[k] for k, ok in zip(keys, correct) if ok)


def training_documents(n_people: int, bio_repeats: int, n_incontext: int, seed: int = 0) -> list[str]:
    """Probe text to mix into training: every biography ``bio_repeats`` times (paraphrases in a
    fresh order each time) and ``n_incontext`` examples each of the in-context tasks drawn from
    other seeds than the scored items (the formats are learnt, the scored contexts are new)."""
    rng = random.Random(seed + 7)
    people = _people(n_people, random.Random(seed))
    docs = []
    for _ in range(bio_repeats):
        for p in people:
            order = rng.sample(BIO_TEMPLATES, len(BIO_TEMPLATES))
            docs.append(" ".join(t.format(**p) for t in order))
    train_seed = seed + 1000
    for it in kv_retrieval(n_incontext, seed=train_seed) + icl(n_incontext, seed=train_seed):
        docs.append(it.prompt + it.answer)
    rounds = multi_round(min(n_incontext, len(FIRST) * len(LAST)), seed=train_seed)
    docs.extend(it.prompt + it.answer for it in rounds * max(1, n_incontext // max(1, len(rounds))))
    return docs


def kv_retrieval(n: int, pairs: int = 8, seed: int = 0) -> list[Item]:
    rng = random.Random(seed + 1)
    items = []
    for _ in range(n):
        keys = rng.sample(WORDS, min(pairs, len(WORDS)))
        vals = [str(rng.randint(10, 99)) for _ in keys]
        q = rng.randrange(len(keys))
        ctx = ", ".join(f"{k} = {v}" for k, v in zip(keys, vals))
        items.append(Item(f"{ctx}. {keys[q]} =", " " + vals[q]))
    return items


def multi_round(n: int, distractors: int = 6, seed: int = 0) -> list[Item]:
    rng = random.Random(seed + 2)
    items = []
    for p in _people(n, rng):
        noise = " ".join(f"The {rng.choice(WORDS)} was {rng.choice(COLOURS)}." for _ in range(distractors))
        items.append(Item(f"Note: {p['name']} lives in {p['city']}. {noise} Question: where does {p['name']} live? Answer:",
                          " " + p["city"]))
    return items


def icl(n: int, shots: int = 4, seed: int = 0) -> list[Item]:
    """A new rule per item (append a random suffix to the word), shown in ``shots`` examples,
    applied to an unseen word."""
    rng = random.Random(seed + 3)
    items = []
    for _ in range(n):
        words = rng.sample(WORDS, shots + 1)
        suffix = rng.choice(SUFFIXES)
        ctx = " ".join(f"{w} -> {w}{suffix}." for w in words[:-1])
        items.append(Item(f"{ctx} {words[-1]} ->", f" {words[-1]}{suffix}"))
    return items


def wilson_ci(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


@torch.no_grad()
def score(model: torch.nn.Module, tokenizer, items: list[Item], device: str | torch.device = "cpu",
          max_len: int | None = None) -> dict:
    """Teacher-forced exact match of every item; ``{"acc", "ci95", "n", "correct"}``.
    ``model(ids)`` must return an object with ``.logits [1, S, V]``."""
    return _summary(score_items(model, tokenizer, items, device, max_len))


@torch.no_grad()
def score_items(model: torch.nn.Module, tokenizer, items: list[Item], device: str | torch.device = "cpu",
                max_len: int | None = None) -> list[bool]:
    """Per-item teacher-forced exact match (see :func:`score`); a prompt longer than
    ``max_len`` minus the answer keeps its last tokens."""
    model.eval()
    out = []
    for it in items:
        p, a = tokenizer.encode(it.prompt), tokenizer.encode(it.answer)
        if max_len is not None and len(p) + len(a) > max_len:
            p = p[len(p) + len(a) - max_len:]
        ids = torch.tensor([p + a], device=device)
        logits = model(ids).logits[0]
        pred = logits[len(p) - 1 : len(p) + len(a) - 1].argmax(-1)
        out.append(bool(torch.equal(pred.cpu(), torch.tensor(a))))
    return out


def run_probes(model: torch.nn.Module, tokenizer, n_people: int, n: int, seed: int = 0,
               device: str | torch.device = "cpu", max_len: int | None = None) -> dict:
    """Every probe on ``model``: ``{name: {"acc", "ci95", "n", "correct"}}``; the recall probe
    also gives ``bits`` (:func:`knowledge_bits`). ``n_people`` must be the number mixed into
    training (:func:`training_documents`); ``n`` items for each in-context probe."""
    recall = biography_recall(n_people, seed)
    ok = score_items(model, tokenizer, recall, device, max_len)
    out = {"knowledge_recall": {**_summary(ok), "bits": knowledge_bits(recall, ok)},
           "knowledge_qa": score(model, tokenizer, biographies(n_people, seed), device, max_len)}
    for name, items in (("kv_retrieval", kv_retrieval(n, seed=seed)), ("multi_round", multi_round(min(n, n_people), seed=seed)),
                        ("icl", icl(n, seed=seed))):
        out[name] = score(model, tokenizer, items, device, max_len)
    return out


def _summary(ok: list[bool]) -> dict:
    c, n = sum(ok), len(ok)
    return {"acc": c / n if n else 0.0, "ci95": list(wilson_ci(c, n)), "n": n, "correct": c}
