"""A knowledge probe for small models: invented facts to mix into training, and their recall.

Facts: ``n_people`` invented people (names from :mod:`ultramem.eval.probes`), each with a city,
a trade and a favourite colour. Values are dealt evenly (every value of an attribute belongs to
``n_people / K`` people, shuffled), so knowing only how often each value occurs gives no more
than chance, ``1/K``. Every fact is stated in ``paraphrases`` wordings (:data:`TEMPLATES`); the
training text is those sentences shuffled into pages of unrelated facts, ``repeats`` times
with a fresh shuffle each time, so a statement can never be copied from an earlier sentence of
its page: the model has to store it in its weights. Sentences are one a line, so every
statement has the tokens it has alone.

Recall: each (person, attribute) is queried once with the prefix of its first wording, exactly
as in training (``"Alda Brandt was born in"``), and the model ranks the attribute's candidate
values by the log-likelihood of their tokens after the prefix (:func:`rank_candidates`).
Ranking is far more sensitive than greedy generation for a tiny model: it needs the right value
to be the likeliest of K, not the likeliest token of the vocabulary. Accuracy comes with a
Wilson 95 % interval; two models scored on the same queries are compared with an exact McNemar
test (:func:`mcnemar`), which uses the pairing and is stricter than comparing intervals.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ultramem.eval.probes import CITIES, COLOURS, FIRST, LAST, wilson_ci

JOBS = ["baker", "pilot", "chemist", "sculptor", "surveyor", "violinist", "glazier", "weaver"]
VALUES = {"city": CITIES, "job": JOBS, "colour": COLOURS}
# "{v}" is the value; the query is the first wording's text before it (the value is its last word)
TEMPLATES = {
    "city": ["{name} was born in {v}.", "The home town of {name} is {v}.", "{name} grew up in {v}."],
    "job": ["{name} works as a {v}.", "By trade, {name} is a {v}.", "{name} earns a living as a {v}."],
    "colour": ["{name}'s favourite colour is {v}.", "The colour {name} likes best is {v}.",
               "{name} always wears {v}."],
}


MAX_PEOPLE = len(FIRST) * len(LAST)  # distinct invented names


@dataclass(frozen=True)
class Query:
    """One fact to recall: ``prompt`` continued by one of ``candidates`` (each with its leading
    space); ``answer`` indexes the true one."""

    person: str
    attribute: str
    prompt: str
    candidates: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class Facts:
    people: tuple[tuple[str, dict[str, str]], ...]  # (name, {attribute: value})
    paraphrases: int

    def sentences(self) -> list[str]:
        """Every statement of every fact, in every wording (person-major order)."""
        return [t.format(name=name, v=attrs[a]) for name, attrs in self.people
                for a, ts in TEMPLATES.items() for t in ts[: self.paraphrases]]

    def queries(self) -> list[Query]:
        out = []
        for name, attrs in self.people:
            for a, ts in TEMPLATES.items():
                prompt = ts[0].split("{v}")[0].rstrip().format(name=name)
                cands = tuple(" " + v for v in VALUES[a])
                out.append(Query(name, a, prompt, cands, VALUES[a].index(attrs[a])))
        return out

    def chance(self) -> float:
        """Expected accuracy of a model that knows no fact (and, values being dealt evenly,
        gains nothing from knowing their frequencies): the mean of 1/K over queries."""
        return sum(1 / len(VALUES[a]) for _ in self.people for a in TEMPLATES) / (len(self.people) * len(TEMPLATES))


def make_facts(n_people: int, seed: int = 0, paraphrases: int = 2) -> Facts:
    """``n_people`` people with evenly dealt attribute values, from ``seed``."""
    if not 1 <= paraphrases <= min(len(t) for t in TEMPLATES.values()):
        raise ValueError(f"paraphrases={paraphrases}: allowed 1..{min(len(t) for t in TEMPLATES.values())}")
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    if not 1 <= n_people <= MAX_PEOPLE:
        raise ValueError(f"n_people={n_people}: allowed 1..{MAX_PEOPLE} (distinct invented names)")
    rng = random.Random(seed)
    rng.shuffle(names)
    dealt = {}
    for a, vals in VALUES.items():
        col = [vals[i % len(vals)] for i in range(n_people)]
        rng.shuffle(col)
        dealt[a] = col
    people = tuple((names[i], {a: dealt[a][i] for a in VALUES}) for i in range(n_people))
    return Facts(people, paraphrases)


def fact_pages(facts: Facts, repeats: int, page_size: int = 16, seed: int = 0,
               keep: Callable[[str], bool] = lambda text: True) -> list[str]:
    """Training documents: ``repeats`` shuffles of every statement, cut into pages of
    ``page_size`` sentences, one a line (so each sentence has the tokens it has alone, as the
    query: after a space, ``"Alda"`` would be the other token ``" Alda"``). ``keep(text)`` must
    hold for each page (the demo passes "falls in the training split"): a page failing it has
    its sentences rotated until it holds."""
    rng = random.Random(seed + 1)
    pages = []
    for _ in range(repeats):
        sents = facts.sentences()
        rng.shuffle(sents)
        for i in range(0, len(sents), page_size):
            page = sents[i: i + page_size]
            for shift in range(len(page)):
                text = "\n".join(page[shift:] + page[:shift])
                if keep(text):
                    break
            else:
                raise ValueError(f"no rotation of fact page {len(pages)} satisfies keep()")
            pages.append(text)
    return pages


def candidate_loglik(model: torch.nn.Module, tokenizer, q: Query, device: str | torch.device = "cpu") -> torch.Tensor:
    """``[K]`` log-likelihood of each candidate's tokens after ``q.prompt`` (one right-padded
    batch of K rows; causal, so the padding cannot change the scored positions).
    ``model(ids)`` must return an object with ``.logits [K, S, V]``."""
    p = tokenizer.encode(q.prompt)
    cands = [tokenizer.encode(c) for c in q.candidates]
    width = len(p) + max(len(c) for c in cands)
    ids = torch.full((len(cands), width), tokenizer.eot_id, dtype=torch.long)
    for k, c in enumerate(cands):
        ids[k, : len(p) + len(c)] = torch.tensor(p + c)
    logp = torch.log_softmax(model(ids.to(device)).logits.float(), dim=-1).cpu()
    out = torch.zeros(len(cands), dtype=torch.float64)
    for k, c in enumerate(cands):
        pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)
        out[k] = logp[k, pos, torch.tensor(c)].double().sum()
    return out


@torch.no_grad()
def rank_candidates(model: torch.nn.Module, tokenizer, queries: Sequence[Query],
                    device: str | torch.device = "cpu", progress: bool = False, desc: str = "recall") -> dict:
    """Top-1 accuracy of candidate ranking over ``queries``:
    ``{"acc", "ci95", "n", "correct", "chance", "per_attribute": {a: acc}, "hits": [0/1 per query]}``.
    A tie counts as wrong unless the true candidate is the first of the tied (``argmax``)."""
    was_training = model.training
    model.eval()
    it = queries
    if progress:
        from tqdm import tqdm  # noqa: PLC0415 (only for interactive runs)

        it = tqdm(queries, desc=desc, unit="fact", dynamic_ncols=True, leave=False, disable=None)
    hits = []
    for q in it:
        hits.append(int(int(candidate_loglik(model, tokenizer, q, device).argmax()) == q.answer))
    model.train(was_training)
    n, correct = len(hits), sum(hits)
    per: dict[str, list[int]] = {}
    for q, h in zip(queries, hits):
        per.setdefault(q.attribute, []).append(h)
    chance = sum(1 / len(q.candidates) for q in queries) / n if n else 0.0
    return {"acc": correct / n if n else 0.0, "ci95": list(wilson_ci(correct, n)), "n": n, "correct": correct,
            "chance": chance, "per_attribute": {a: sum(v) / len(v) for a, v in per.items()}, "hits": hits}


def mcnemar(hits_a: Sequence[int], hits_b: Sequence[int]) -> dict:
    """Exact two-sided McNemar test of two models' 0/1 hits on the same queries:
    ``{"a_only", "b_only", "p"}`` (``p``: probability of a split this uneven or more between
    the discordant queries if both models were equally good)."""
    if len(hits_a) != len(hits_b):
        raise ValueError(f"hits of {len(hits_a)} and {len(hits_b)} queries: the tests must share queries")
    a_only = sum(1 for a, b in zip(hits_a, hits_b) if a and not b)
    b_only = sum(1 for a, b in zip(hits_a, hits_b) if b and not a)
    n, k = a_only + b_only, min(a_only, b_only)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": p}
