"""lm-evaluation-harness on a run and on an exported directory, with the local tasks."""

from __future__ import annotations

import json

import pytest
import torch
from hf_helpers import make_run

from ultramem.errors import ConfigError
from ultramem.eval.harness import run_harness
from ultramem.eval.harness_data import asset_dir
from ultramem.hf.export import export_run
from ultramem.inference.load import load_run

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

LIMIT = 12


def _expected_acc(run) -> float:
    """Accuracy recomputed by hand: summed log-probability of each choice after the context,
    tokenised as lm-eval does (the whole string, the context's tokens split off)."""
    loaded = load_run(run)
    tok, model = loaded.tokenizer, loaded.model
    docs = [json.loads(ln) for ln in (asset_dir() / "ultramem_corpus_recall.jsonl").read_text().splitlines()][:LIMIT]
    hits = 0
    for d in docs:
        scores = []
        ctx = tok.encode(d["context"])
        for choice in d["choices"]:
            whole = tok.encode(d["context"] + choice)
            cont = whole[len(ctx):]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = model(ids).logits[0].float().log_softmax(-1)
            pos = torch.arange(len(ctx) - 1, len(whole) - 1)
            scores.append(logp[pos, torch.tensor(cont)].sum().item())
        hits += int(max(range(4), key=lambda i: scores[i]) == d["gold"])
    return hits / len(docs)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("harness") / "run", "tiny-ultramem", "model.max_seq_len=128")


def test_local_task_on_run_and_export(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    res = run_harness(tiny_run, ["ultramem_corpus_recall"], limit=LIMIT, batch_size=4)
    acc = res["ultramem_corpus_recall"]["acc"]
    assert acc == pytest.approx(_expected_acc(tiny_run))
    exported = export_run(tiny_run, tmp_path / "export")
    res2 = run_harness(exported, ["ultramem_corpus_recall"], limit=LIMIT, batch_size=4)
    assert res2["ultramem_corpus_recall"]["acc"] == pytest.approx(acc)
    assert "acc_norm" in res2["ultramem_corpus_recall"]


def test_unknown_task_is_a_config_error(tiny_run):
    with pytest.raises(ConfigError, match="unknown task"):
        run_harness(tiny_run, ["ultramem_no_such_task"], limit=2)
