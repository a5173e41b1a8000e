"""Synthetic probes: deterministic from a seed, answers present in their context, Wilson CI,
teacher-forced scoring."""

import pytest
import torch

from ultramem.data.tokenizer import Tokenizer
from ultramem.eval import probes
from ultramem.model.transformer import Transformer
from ultramem.resolve import load_config


def test_generators_are_deterministic_per_seed_and_differ_across_seeds():
    for gen in (lambda s: probes.biographies(20, s), lambda s: probes.kv_retrieval(20, seed=s),
                lambda s: probes.multi_round(20, seed=s), lambda s: probes.icl(20, seed=s)):
        assert gen(0) == gen(0) and gen(0) != gen(1)


def test_answers_are_stated_in_the_context_or_the_corpus():
    corpus = probes.biography_corpus(30, seed=4)
    for it in probes.biographies(30, seed=4):
        name = next(n for n in (d.split(" was born")[0] for d in corpus) if n in it.prompt)
        doc = next(d for d in corpus if d.startswith(name))
        assert it.answer.strip() in doc
    for gen in (probes.kv_retrieval(20), probes.multi_round(20)):
        for it in gen:
            assert it.answer.startswith(" ") and it.answer.strip() in it.prompt
    for it in probes.icl(20):
        query = it.prompt.rsplit(" ", 2)[-2]
        suffix = it.answer.strip()[len(query):]
        assert it.answer == f" {query}{suffix}" and f"{suffix}." in it.prompt and query not in it.prompt[:-len(query) - 4]


def test_wilson_interval_known_values():
    lo, hi = probes.wilson_ci(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert probes.wilson_ci(0, 50)[0] == pytest.approx(0.0) and probes.wilson_ci(50, 50)[1] == pytest.approx(1.0)


class _Oracle(torch.nn.Module):
    """Predicts token t+1 from the item's own ids (perfect) or a fixed token (always wrong)."""

    def __init__(self, vocab: int, perfect: bool) -> None:
        super().__init__()
        self.vocab, self.perfect, self.ids = vocab, perfect, None

    def forward(self, ids):
        logits = torch.zeros(1, ids.shape[1], self.vocab)
        nxt = torch.cat([ids[0, 1:], ids[0, -1:]]) if self.perfect else torch.full((ids.shape[1],), 3)
        logits[0, torch.arange(ids.shape[1]), nxt] = 1.0
        return type("Out", (), {"logits": logits})()


def test_score_counts_exact_matches():
    tok = Tokenizer()
    items = probes.icl(12)
    assert probes.score(_Oracle(tok.vocab_size, True), tok, items)["acc"] == 1.0
    res = probes.score(_Oracle(tok.vocab_size, False), tok, items)
    assert res["acc"] == 0.0 and res["n"] == 12 and res["ci95"][0] == 0.0


def test_score_runs_on_a_model():
    tok = Tokenizer()
    cfg = load_config(preset="tiny-dense")
    res = probes.score(Transformer.build(cfg.model), tok, probes.kv_retrieval(4))
    assert 0.0 <= res["acc"] <= 1.0 and res["n"] == 4


def test_recall_prompts_are_the_training_phrasing_and_bits_count_correct_answers():
    docs = probes.training_documents(12, bio_repeats=2, n_incontext=5, seed=3)
    items = probes.biography_recall(12, seed=3)
    assert len(items) == 12 * len(probes.BIO_RECALL)
    bios = docs[: 2 * 12]
    for it in items:  # prompt + answer is verbatim in some training statement of that person
        assert any(it.prompt + it.answer in d for d in bios), it
    assert len(docs) == 2 * 12 + 5 + 5 + 5
    ok = [False] * len(items)
    assert probes.knowledge_bits(items, ok) == 0
    ok[0] = ok[1] = True  # the first person's year (100 values) and city (10)
    assert probes.knowledge_bits(items, ok) == pytest.approx(probes.math.log2(100) + probes.math.log2(10))
    # the scored in-context items are not among the training examples
    scored = {it.prompt for it in probes.kv_retrieval(5) + probes.icl(5)}
    assert not scored & {d.rsplit(" ", 1)[0] for d in docs}


def test_long_prompts_keep_their_last_tokens_within_max_len():
    seen = []

    class Echo(torch.nn.Module):
        def forward(self, ids):
            seen.append(ids.shape[1])
            return type("O", (), {"logits": torch.zeros(1, ids.shape[1], 50)})()

    class Tok:
        def encode(self, s):
            return [len(w) % 50 for w in s.split()]

    items = [probes.Item("a " * 40, " bb cc")]
    probes.score_items(Echo(), Tok(), items, max_len=16)
    probes.score_items(Echo(), Tok(), items)
    assert seen == [16, 42]
