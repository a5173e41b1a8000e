"""``ultramem data build``: a spec'd dataset, its manifest, and a rebuild that differs stops."""

import json
from pathlib import Path

import numpy as np
import pytest

from ultramem.data.build import build
from ultramem.data.index import load_index
from ultramem.data.loader import split_tokens
from ultramem.data.tokenizer import Tokenizer, default_tokenizer_path
from ultramem.errors import DataError


def _spec(tmp_path: Path, **kw) -> Path:
    spec = {"packages": [{"module": "ultramem.presets", "dist": "ultramem"}, {"module": "ultramem.layers"}],
            "tokenizer": "tok.json", "manifest": "manifest.json", "files": "files.txt.gz",
            "val_fraction": 0.3, "min_train_tokens": 1000,
            "probes": {"people": 10, "bio_repeats": 3, "in_context": 4, "seed": 0}, **kw}
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(spec))
    (tmp_path / "tok.json").write_bytes(default_tokenizer_path().read_bytes())
    return p


def test_build_writes_the_manifest_and_an_identical_rebuild_passes(tmp_path):
    spec = _spec(tmp_path)
    m = build(spec, tmp_path / "a")
    assert (tmp_path / "manifest.json").is_file() and (tmp_path / "files.txt.gz").is_file()
    assert [p["module"] for p in m["packages"]] == ["ultramem.presets", "ultramem.layers"]
    assert all(p["files"] > 0 for p in m["packages"]) and m["packages"][0]["version"]
    index = load_index(tmp_path / "a")
    assert index["splits"]["train"]["tokens"] == m["splits"]["train"]["tokens"] > 1000
    assert build(spec, tmp_path / "b")["splits"] == m["splits"]  # checked against the manifest: same
    # every probe document is in the training split, none in validation
    val = np.concatenate(split_tokens(tmp_path / "a", "val"))
    text = Tokenizer(tmp_path / "tok.json").decode(val.tolist())
    assert "favourite colour" not in text and len(text) > 0


def test_a_rebuild_that_differs_is_one_data_error(tmp_path):
    build(_spec(tmp_path), tmp_path / "a")
    changed = _spec(tmp_path, probes={"people": 10, "bio_repeats": 4, "in_context": 4, "seed": 0})
    with pytest.raises(DataError, match="differs from .*manifest.json: probe settings differ; train token stream"):
        build(changed, tmp_path / "b")
    build(changed, tmp_path / "b", write_manifest=True)  # recorded instead
    assert json.loads((tmp_path / "manifest.json").read_text())["probes"]["bio_repeats"] == 4


def test_missing_packages_tokenizer_and_too_few_tokens_are_data_errors(tmp_path):
    spec = _spec(tmp_path, packages=[{"module": "ultramem.presets"}, {"module": "no_such_pkg_xyz"}])
    with pytest.raises(DataError, match="not installed .*no_such_pkg_xyz"):
        build(spec, tmp_path / "a")
    spec = _spec(tmp_path, tokenizer="missing.json")
    with pytest.raises(DataError, match="missing.json: tokenizer missing; pass --train-tokenizer"):
        build(spec, tmp_path / "a")
    with pytest.raises(DataError, match="the spec asks for >= 10,000,000,000"):
        build(_spec(tmp_path, min_train_tokens=10**10), tmp_path / "a")
    assert not (tmp_path / "manifest.json").exists()  # a failed build records nothing
