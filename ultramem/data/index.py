"""A prepared dataset's ``index.json``: reading it, checking it against a model, verifying its
shards, and the dataset's identity (what a checkpoint records to make resume exact).

Layout (text datasets, written by :mod:`ultramem.data.prepare`)::

    OUT/index.json                      the index (replaced atomically, last)
    OUT/shards-<id>/{train,val}_NNNNN.bin, tokenizer.json

Shard paths in the index are relative to ``OUT`` (``.npy`` datasets reference files in place).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ultramem.errors import DataError

INDEX = "index.json"
FORMAT_VERSION = 1


def load_index(path: str | Path) -> dict:
    p = Path(path)
    if not (p / INDEX).is_file():
        hint = f" (run `ultramem data prepare --out {p}`)" if not p.exists() else ""
        raise DataError(f"{p}: not a prepared dataset, no {INDEX}{hint}")
    try:
        index = json.loads((p / INDEX).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p / INDEX}: unreadable ({e}); prepare the dataset again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT_VERSION:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise DataError(f"{p}/{INDEX}: format {got} is not {FORMAT_VERSION}")
    return index


def check_vocab(index: dict[str, Any], vocab_size: int, where: str) -> None:
    """The dataset's token ids must fit the model's embedding."""
    if index["vocab_size"] > vocab_size:
        raise DataError(
            f"tokenizer/model vocabulary mismatch: {where} has vocab_size={index['vocab_size']} but "
            f"model.vocab_size={vocab_size}; set model.vocab_size={index['vocab_size']}")


def shard_path(path: str | Path, index: dict[str, Any], shard: dict[str, Any]) -> Path:
    return Path(shard["file"]) if index["kind"] == "npy" else Path(path) / shard["file"]


def dataset_identity(index: dict[str, Any]) -> dict[str, Any]:
    """What the bytes of each split are: a sha256 over the shards' sha256s (text datasets) or
    over the referenced (file, offset, tokens) of ``.npy`` datasets. Equal identity = the same
    token stream, so a resume reads exactly the batches the interrupted run would have."""
    out: dict[str, Any] = {"kind": index["kind"], "vocab_size": index["vocab_size"]}
    for split, info in index["splits"].items():
        h = hashlib.sha256()
        for shard in info["shards"]:
            key = shard.get("sha256") or f"{shard['file']}:{shard.get('offset', 0)}:{shard['tokens']}"
            h.update(f"{key}\n".encode())
        out[split] = {"tokens": info["tokens"], "sha256": h.hexdigest()}
    return out


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`dataset_identity` results."""
    diff = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                a, b = f"{a.get('tokens')} tokens, sha256 {str(a.get('sha256'))[:12]}", \
                       f"{b.get('tokens')} tokens, sha256 {str(b.get('sha256'))[:12]}"
            diff.append(f"{key}: {a} -> {b}")
    return diff


def verify_shards(path: str | Path, index: dict[str, Any], splits: tuple[str, ...] = ("train", "val")) -> None:
    """Check every text shard's size and sha256 against the index (about 1 s per GB); a
    missing, truncated or corrupt shard is a DataError naming the file."""
    if index["kind"] != "text":
        return
    itemsize = 2 if index["dtype"] == "uint16" else 4
    for split in splits:
        for shard in index["splits"].get(split, {}).get("shards", []):
            f = shard_path(path, index, shard)
            if not f.is_file():
                raise DataError(f"{f}: shard missing from the prepared dataset; prepare it again")
            size = f.stat().st_size
            if size != shard["tokens"] * itemsize:
                raise DataError(f"{f}: {size} bytes, the index says {shard['tokens'] * itemsize} "
                                f"(truncated?); prepare the dataset again")
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            if h.hexdigest() != shard["sha256"]:
                raise DataError(f"{f}: sha256 differs from {Path(path) / INDEX} (corrupt shard); "
                                f"prepare the dataset again")
