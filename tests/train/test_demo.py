"""``ultramem demo``: the equal-FLOPs pair, the fact-mixed data, and the command end to end."""

import json

import numpy as np

from ultramem.accounting import count
from ultramem.data.corpus import read_file
from ultramem.data.loader import split_tokens
from ultramem.data.prepare import prepare_documents
from ultramem.data.tokenizer import Tokenizer
from ultramem.eval.knowledge import make_facts
from ultramem.train.demo import DEMO_MODELS, demo_configs, equal_flops, prepare_demo_data


def test_demo_pair_has_equal_flops_and_the_memory_has_the_params(tmp_path):
    cfgs = demo_configs(tmp_path, 10, None, [])
    assert list(cfgs) == list(DEMO_MODELS) == ["ultramem", "dense"]
    um, dn = (count(cfgs[n].model) for n in ("ultramem", "dense"))
    assert um.flops_per_token == dn.flops_per_token  # exactly, by the dense MLP's width
    assert equal_flops(cfgs)
    assert um.params > 3 * dn.params and um.active_params < 1.1 * dn.active_params
    assert cfgs["ultramem"].model.memory is not None and cfgs["dense"].model.memory is None
    assert {c.train.max_steps for c in cfgs.values()} == {10}
    # the check can fail: the stock tiny presets are 15 % apart
    assert not equal_flops(demo_configs(tmp_path, 10, ["tiny-ultramem", "tiny-dense"], []))


def _contains(hay: np.ndarray, needle: list[int]) -> bool:
    n = len(needle)
    starts = np.flatnonzero(hay[: hay.size - n + 1] == needle[0])
    return any(hay[s: s + n].tolist() == needle for s in starts)


def test_facts_go_to_the_training_split_only(tmp_path, slice_path):
    """The validation split is the corpus's own; every queried fact is in the training split in
    the probe's tokens; a second call reuses the preparation, another fact spec redoes it."""
    def corpus():
        return read_file(slice_path)

    facts = make_facts(6, paraphrases=2)
    index, fresh = prepare_demo_data(tmp_path / "d", facts, repeats=2, corpus=corpus)
    plain = prepare_documents(corpus(), tmp_path / "plain")
    assert fresh and index["splits"]["val"]["tokens"] == plain["splits"]["val"]["tokens"] > 0
    assert index["splits"]["train"]["documents"] > plain["splits"]["train"]["documents"]
    tok = Tokenizer()
    train = np.concatenate(split_tokens(tmp_path / "d", "train"))
    val = np.concatenate(split_tokens(tmp_path / "d", "val"))
    for q in facts.queries():
        ids = tok.encode(q.prompt) + tok.encode(q.candidates[q.answer])
        assert _contains(train, ids) and not _contains(val, ids)
    assert prepare_demo_data(tmp_path / "d", facts, repeats=2, corpus=corpus)[1] is False
    assert prepare_demo_data(tmp_path / "d", facts, repeats=3, corpus=corpus)[1] is True


def test_demo_smoke_and_rerun_resumes(tmp_path, capsys):
    """``ultramem demo`` end to end, shrunk (the bundled corpus, the demo pair, 2 steps, recall
    after each): table, paired test, demo.json/png, sample; the same command again reuses
    the finished runs and reproduces the numbers."""
    from ultramem.cli import main

    argv = ["demo", "--out", str(tmp_path), "--steps", "2", "--recall-every", "1", "--people", "8",
            "--repeats", "2", "train.eval_batches=1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "FLOPs/token" in out and "McNemar" in out and "sample from ultramem" in out and "note:" not in out
    first = json.loads((tmp_path / "demo.json").read_text())
    assert [r["name"] for r in first["rows"]] == ["ultramem", "dense"] and first["equal_flops"]
    for r in first["rows"]:
        assert [c["step"] for c in r["recall_curve"]] == [1, 2] and r["recall"]["n"] == 24
        assert (tmp_path / r["name"] / "recall.jsonl").is_file()
    assert (tmp_path / "demo.png").is_file()

    assert main(argv) == 0
    assert "prepared" not in capsys.readouterr().out  # data reused
    again = json.loads((tmp_path / "demo.json").read_text())
    for a, b in zip(first["rows"], again["rows"]):
        assert (a["val_loss"], a["recall"]) == (b["val_loss"], b["recall"])
    assert not list(tmp_path.glob("*.prev-*"))  # resumed, not moved aside


def test_demo_bad_people_is_one_line(tmp_path, capsys):
    from ultramem.cli import main

    assert main(["demo", "--out", str(tmp_path), "--people", "9999"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--people=9999: allowed 1..360" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "data").exists()  # checked before any work


def test_demo_with_presets_and_changed_config(tmp_path, capsys):
    """``--presets`` trains stock presets (flagged as not equal-FLOPs when they are not); a
    changed config moves the previous run aside instead of resuming it."""
    from ultramem.cli import main

    base = ["demo", "--out", str(tmp_path), "--people", "4", "--repeats", "1", "--presets", "tiny-dense",
            "nope", "model.n_layers=1", "train.eval_batches=1"]
    assert main([*base, "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "skipping preset 'nope'" in out and "sample from tiny-dense" in out
    assert main([*base, "--steps", "2"]) == 0
    assert "config changed" in capsys.readouterr().out
    assert len(list(tmp_path.glob("tiny-dense.prev-*"))) == 1
    assert json.loads((tmp_path / "tiny-dense" / "summary.json").read_text())["step"] == 2
