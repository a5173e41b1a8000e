"""The demo's knowledge probe: fact generation, training pages, candidate-ranking recall."""

from collections import Counter

import pytest
import torch

from ultramem.data.tokenizer import Tokenizer
from ultramem.eval.knowledge import (
    TEMPLATES,
    VALUES,
    candidate_loglik,
    fact_pages,
    make_facts,
    mcnemar,
    rank_candidates,
)


def test_facts_are_seeded_distinct_and_evenly_dealt():
    a, b = make_facts(30, seed=0), make_facts(30, seed=0)
    assert a == b and make_facts(30, seed=1) != a
    names = [n for n, _ in a.people]
    assert len(set(names)) == 30
    for attr, vals in VALUES.items():
        c = Counter(p[attr] for _, p in a.people)
        assert set(c) == set(vals) and max(c.values()) - min(c.values()) <= 1  # so chance is 1/K
    assert a.chance() == pytest.approx((1 / 10 + 1 / 8 + 1 / 8) / 3)
    with pytest.raises(ValueError, match="n_people"):
        make_facts(10_000)
    with pytest.raises(ValueError, match="paraphrases"):
        make_facts(3, paraphrases=9)


def test_queries_ask_in_the_training_wording_and_tokens():
    """The query + true value is a training sentence's start, token for token, so the probe
    asks exactly what training stated."""
    facts = make_facts(12, paraphrases=2)
    tok = Tokenizer()
    sentences = facts.sentences()
    assert len(sentences) == 12 * len(TEMPLATES) * 2
    queries = facts.queries()
    assert len(queries) == 12 * len(TEMPLATES)
    for q in queries:
        stated = q.prompt + q.candidates[q.answer] + "."
        assert stated in sentences
        assert q.candidates[q.answer].strip() == dict(facts.people)[q.person][q.attribute]
        assert tok.encode(q.prompt) + tok.encode(q.candidates[q.answer]) == tok.encode(stated)[:-1]


def test_pages_hold_every_statement_repeats_times_and_obey_keep():
    facts = make_facts(10, paraphrases=2)
    pages = fact_pages(facts, repeats=3, page_size=7)
    counts = Counter(s for p in pages for s in facts.sentences() if s in p)
    assert all(counts[s] == 3 for s in facts.sentences())
    assert sum(p.count(".") for p in pages) == 3 * len(facts.sentences())  # nothing else on the pages
    assert all(len(p.split("\n")) <= 7 and set(p.split("\n")) <= set(facts.sentences()) for p in pages)
    assert fact_pages(facts, 3, 7) == pages and fact_pages(facts, 3, 7, seed=5) != pages
    first = facts.sentences()[0]
    kept = fact_pages(facts, 3, 7, keep=lambda text: not text.startswith(first))
    assert not any(p.startswith(first) for p in kept)
    assert sorted("\n".join(kept).split("\n")) == sorted("\n".join(pages).split("\n"))  # same statements
    with pytest.raises(ValueError, match="keep"):
        fact_pages(facts, 1, 7, keep=lambda text: False)


class PrefixMemoriser(torch.nn.Module):
    """A model that has memorised token sequences exactly: the logit of each next token seen
    after the same prefix (from position 0) in the training sequences; 0 elsewhere."""

    def __init__(self, sequences: list[list[int]], vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.next: dict[tuple[int, ...], Counter] = {}
        for s in sequences:
            for t in range(len(s) - 1):
                self.next.setdefault(tuple(s[: t + 1]), Counter())[s[t + 1]] += 1

    def forward(self, ids: torch.Tensor):
        logits = torch.zeros(*ids.shape, self.vocab)
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                for tok, n in self.next.get(tuple(ids[b, : t + 1].tolist()), {}).items():
                    logits[b, t, tok] = 5.0 * n
        return type("Out", (), {"logits": logits})()


def test_recall_of_a_memoriser_beats_chance_and_unseen_facts_stay_at_chance():
    tok = Tokenizer()
    facts = make_facts(20, seed=0, paraphrases=2)
    model = PrefixMemoriser([tok.encode(s) for s in facts.sentences()], tok.vocab_size)
    seen = rank_candidates(model, tok, facts.queries())
    assert seen["acc"] == 1.0 and seen["n"] == 60 and seen["ci95"][0] > seen["chance"]
    assert seen["per_attribute"] == {a: 1.0 for a in TEMPLATES}
    unseen = rank_candidates(model, tok, make_facts(20, seed=7).queries())  # other people: no memory
    assert unseen["acc"] <= 0.25 and unseen["ci95"][0] < unseen["chance"] < unseen["ci95"][1]
    assert sum(seen["hits"]) == seen["correct"] == 60


def test_candidate_loglik_is_unaffected_by_the_padding():
    """Each candidate's log-likelihood in the padded batch equals the one of its own unpadded
    forward (a random tiny Transformer, so the numbers are not trivial)."""
    from ultramem.model.transformer import Transformer
    from ultramem.resolve import load_config

    cfg = load_config(preset="tiny-dense", overrides=["model.n_layers=1", "model.d_model=32", "model.n_heads=2",
                                                      "model.ffn.hidden=64"])
    model = Transformer.build(cfg.model, torch.device("cpu")).eval()
    tok = Tokenizer()
    q = make_facts(3).queries()[0]
    with torch.no_grad():
        batched = candidate_loglik(model, tok, q)
        p = tok.encode(q.prompt)
        for k, c in enumerate(q.candidates):
            ids = tok.encode(c)
            logp = torch.log_softmax(model(torch.tensor([p + ids])).logits[0].float(), -1)
            alone = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(ids))
            assert float(batched[k]) == pytest.approx(alone, abs=1e-4)
    assert len({round(float(x), 3) for x in batched}) > 1


def test_mcnemar_exact():
    assert mcnemar([1, 1, 0], [1, 1, 0]) == {"a_only": 0, "b_only": 0, "p": 1.0}
    r = mcnemar([0] * 6 + [1] * 4, [1] * 6 + [1] * 4)  # 6 discordant, all one way
    assert (r["a_only"], r["b_only"]) == (0, 6) and r["p"] == pytest.approx(2 / 64)
    assert mcnemar([1, 0, 1, 0], [0, 1, 0, 1])["p"] == 1.0  # 2 vs 2
    with pytest.raises(ValueError, match="share queries"):
        mcnemar([1], [1, 0])
