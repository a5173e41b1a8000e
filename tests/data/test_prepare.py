"""Data preparation: deterministic shards on the committed slice, sources, bad-input errors."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ultramem.data.corpus import read_file, read_source_tree
from ultramem.data.loader import TokenBatches, split_tokens
from ultramem.data.prepare import is_val, load_index, prepare_documents, prepare_npy, unigram_entropy
from ultramem.data.tokenizer import Tokenizer
from ultramem.errors import DataError

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "slice_shards.json"


def _shard_hashes(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.rglob("*.bin"))}


def test_slice_is_at_most_1mb(slice_path):
    assert slice_path.stat().st_size <= 1_000_000


def test_prepare_slice_deterministic(slice_data, slice_path, tmp_path):
    again = tmp_path / "again"
    prepare_documents(read_file(slice_path), again, val_fraction=0.05)
    hashes = _shard_hashes(slice_data)
    assert hashes == _shard_hashes(again)
    index = load_index(slice_data)
    for split in ("train", "val"):
        for shard in index["splits"][split]["shards"]:
            assert shard["sha256"] == hashes[Path(shard["file"]).name]
    assert index["splits"]["val"]["tokens"] > 0 and index["splits"]["train"]["tokens"] > 0
    assert json.loads(GOLDEN.read_text()) == hashes, "shard bytes changed (tokenizer or prepare changed?)"


def test_split_by_document_hash():
    assert is_val("abc", 1.0) and not is_val("abc", 0.0)
    frac = np.mean([is_val(f"document {i}", 0.1) for i in range(4000)])
    assert 0.08 < frac < 0.12


def test_tokenizer_roundtrip():
    tok = Tokenizer()
    assert tok.vocab_size == 8192 and tok.eot_id == 0
    text = "In the beginning God created the heaven and the earth. ünïcödé ✓"
    assert tok.decode(tok.encode(text)) == text


def test_unigram_entropy_and_loader(slice_data):
    h = unigram_entropy(slice_data)
    assert 4.0 < h < 9.0
    a = TokenBatches(slice_data, "train", 16, 4, seed=1)
    b = TokenBatches(slice_data, "train", 16, 4, seed=1)
    x, y = a.batch(7)
    assert x.shape == (4, 16) and (x == b.batch(7)[0]).all() and (x[:, 1:] == y[:, :-1]).all()
    r0 = TokenBatches(slice_data, "train", 16, 4, seed=1, rank=0, world=2).batch(3)[0]
    r1 = TokenBatches(slice_data, "train", 16, 4, seed=1, rank=1, world=2).batch(3)[0]
    assert not (r0 == r1).all()


def test_jsonl_and_source_dir(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello world " * 50}) + "\n" + json.dumps({"text": "bye " * 50}) + "\n")
    index = prepare_documents(read_file(tmp_path / "a.jsonl"), tmp_path / "out", val_fraction=0.0)
    assert index["splits"]["train"]["documents"] == 2
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "m.py").write_text("def f():\n    return 1\n")
    (src / "blob.bin").write_bytes(b"\x00\x01")
    docs = list(read_source_tree(src))
    assert [d.doc_id for d in docs] == ["pkg/m.py"]


@pytest.mark.parametrize("real_npy", [True, False])
def test_npy_tokens_used_in_place(tmp_path, real_npy):
    tokens = np.arange(5000, dtype=np.uint16) % 700
    f = tmp_path / "part-0.npy"
    if real_npy:
        np.save(f, tokens)
    else:
        tokens.tofile(f)  # OLMo-style raw memmap
    index = prepare_npy([f], tmp_path / "out", val_fraction=0.1)
    assert index["vocab_size"] == 700 and not list((tmp_path / "out").glob("*.bin"))
    train = np.concatenate(split_tokens(tmp_path / "out", "train"))
    val = np.concatenate(split_tokens(tmp_path / "out", "val"))
    assert (np.concatenate([train, val]) == tokens).all() and val.size == 500


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(read_file(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        list(read_file(tmp_path / "empty.txt"))
    (tmp_path / "blank.txt").write_text("  \n\n ")
    with pytest.raises(DataError, match="whitespace"):
        list(read_file(tmp_path / "blank.txt"))
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(DataError, match="no 'text' field"):
        list(read_file(tmp_path / "x.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="not valid JSON"):
        list(read_file(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_index(tmp_path / "nowhere")
    (tmp_path / "e.npy").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        prepare_npy([tmp_path / "e.npy"], tmp_path / "o")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *a, **kw):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="needs pyarrow"):
        list(read_file(tmp_path / "t.parquet"))
