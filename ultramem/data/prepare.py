"""Text -> token shards: ``shards-<id>/{train,val}_NNNNN.bin`` (raw uint16/uint32 memmaps) +
``index.json``.

    ultramem data prepare --out data/default                     # the bundled default corpus
    ultramem data prepare --out data/mine --input a.txt b.jsonl  # local files
    ultramem data prepare --out data/code --source-dir .venv/lib/python3.11/site-packages
    ultramem data prepare --out data/olmo --npy part-000.npy     # pre-tokenized, used in place

The split is per document: a document is validation when the first 8 bytes of
``sha256(text)``, read as an integer, fall below ``val_fraction * 2**64``. Each document's
tokens are followed by ``<|endoftext|>``. The index records every shard's token count and
sha256, the tokenizer's sha256 and vocabulary size, and the UTF-8 byte count of each split
(for bits per byte).

Atomic: a preparation writes into ``OUT/.tmp-<id>/``, fsyncs, renames it to ``OUT/shards-<id>/``
and then replaces ``index.json`` (``os.replace``); only after that are the previous
preparation's shards deleted. A bad input, an interrupt or a crash at any point leaves the
previous dataset whole (its index and its shards); leftover ``.tmp-*`` directories are removed
by the next preparation.

Pre-tokenized ``.npy`` files (OLMo/Dolma style: a real ``.npy`` or a raw memmap of
``--npy-dtype``) are referenced, not copied: the last ``val_fraction`` of each file's
tokens is the validation split (the files carry no document boundaries we could hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ultramem.data.corpus import Document
from ultramem.data.index import FORMAT_VERSION, INDEX, load_index
from ultramem.data.tokenizer import Tokenizer
from ultramem.errors import DataError
from ultramem.outdir import fsync_dir, make_out_dir

__all__ = ["INDEX", "load_index", "prepare_documents", "prepare_npy"]
SHARD_TOKENS = 1 << 25  # 32 M tokens per shard (64 MiB as uint16)


def is_val(text: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h < val_fraction * 2**64


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class _SplitWriter:
    out: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)
    buf: list[np.ndarray] = field(default_factory=list)
    n_buf: int = 0
    n_docs: int = 0
    n_bytes: int = 0

    def add(self, ids: list[int], eot: int, n_bytes: int) -> None:
        arr = np.asarray(ids + [eot], dtype=self.dtype)
        self.buf.append(arr)
        self.n_buf += arr.size
        self.n_docs += 1
        self.n_bytes += n_bytes
        while self.n_buf >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        data = np.concatenate(self.buf) if self.buf else np.zeros(0, self.dtype)
        head, rest = data[:n], data[n:]
        self.buf, self.n_buf = ([rest] if rest.size else []), rest.size
        if head.size == 0:
            return
        name = f"{self.split}_{len(self.shards):05d}.bin"
        raw = head.tobytes()
        with open(self.out / name, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        self.shards.append({"file": name, "tokens": int(head.size), "sha256": hashlib.sha256(raw).hexdigest()})

    def close(self) -> dict:
        self._flush(self.n_buf)
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards),
                "documents": self.n_docs, "bytes": self.n_bytes}


def prepare_documents(
    docs: Iterable[Document],
    out: str | Path,
    tokenizer: Tokenizer | None = None,
    val_fraction: float = 0.01,
    sources: list[str] | None = None,
    shard_tokens: int = SHARD_TOKENS,
    batch_docs: int = 256,
    progress: bool = False,
) -> dict:
    """Tokenize ``docs`` into ``out`` atomically (see the module docstring); returns the index
    (also written to ``out/index.json``)."""
    _check_val_fraction(val_fraction)
    tok = tokenizer or Tokenizer()
    out = _make_out(out)
    gen = f"shards-{uuid.uuid4().hex[:8]}"
    tmp = out / f".tmp-{gen}"
    tmp.mkdir()
    try:
        if progress:
            from tqdm import tqdm  # noqa: PLC0415 (only for the command line)

            docs = tqdm(docs, desc=f"preparing {out}", unit="doc", dynamic_ncols=True, disable=None)  # off when not a tty
        splits = _write_shards(docs, tmp, tok, val_fraction, shard_tokens, batch_docs)
        shutil.copyfile(tok.path, tmp / "tokenizer.json")
        fsync_dir(tmp)
        os.rename(tmp, out / gen)
    except BaseException:  # bad input, interrupt, full disk: the previous dataset stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for info in splits.values():
        for shard in info["shards"]:
            shard["file"] = f"{gen}/{shard['file']}"
    index = {
        "format": FORMAT_VERSION,
        "kind": "text",
        "dtype": token_dtype(tok.vocab_size).name,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "tokenizer": f"{gen}/tokenizer.json",
        "tokenizer_sha256": tok.sha256(),
        "val_fraction": val_fraction,
        "sources": sources or [],
        "splits": splits,
    }
    _swap_index(out, index, keep=gen)
    return index


def _write_shards(docs: Iterable[Document], tmp: Path, tok: Tokenizer, val_fraction: float,
                  shard_tokens: int, batch_docs: int) -> dict:
    dtype = token_dtype(tok.vocab_size)
    writers = {s: _SplitWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
    seen = 0

    def flush(batch: list[Document]) -> None:
        for doc, ids in zip(batch, tok.encode_batch([d.text for d in batch])):
            split = doc.split or ("val" if is_val(doc.text, val_fraction) else "train")
            writers[split].add(ids, tok.eot_id, len(doc.text.encode("utf-8")))

    batch: list[Document] = []
    for doc in docs:
        if not doc.text.strip():
            continue
        batch.append(doc)
        seen += 1
        if len(batch) >= batch_docs:
            flush(batch)
            batch = []
    flush(batch)
    if seen == 0:
        raise DataError("no documents with text in the input")
    splits = {s: w.close() for s, w in writers.items()}
    if splits["train"]["tokens"] == 0:
        raise DataError(f"every document fell in the validation split (val_fraction={val_fraction})")
    return splits


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction={val_fraction}: allowed 0 <= val_fraction < 1")


def _make_out(out: str | Path) -> Path:
    out = make_out_dir(out, DataError)
    for stale in out.glob(".tmp-*"):  # left by a killed preparation
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
    return out


def _swap_index(out: Path, index: dict, keep: str | None = None) -> None:
    """Replace ``out/index.json`` atomically, then delete what the previous index used."""
    _write_index(out, index)
    fsync_dir(out)
    for d in out.glob("shards-*"):
        if d.is_dir() and d.name != keep:
            shutil.rmtree(d, ignore_errors=True)
    for old in [*out.glob("train_*.bin"), *out.glob("val_*.bin")]:  # the flat layout of format 1
        old.unlink()
    if index.get("tokenizer") != "tokenizer.json" and (out / "tokenizer.json").is_file():
        (out / "tokenizer.json").unlink()


def prepare_npy(
    files: list[str | Path], out: str | Path, val_fraction: float = 0.01,
    vocab_size: int | None = None, npy_dtype: str = "uint16", eot_id: int | None = None,
) -> dict:
    """Reference pre-tokenized token files in an index (no copy)."""
    _check_val_fraction(val_fraction)
    if npy_dtype not in ("uint16", "uint32"):
        raise DataError(f"--npy-dtype={npy_dtype!r}: allowed 'uint16', 'uint32'")
    if vocab_size is not None and vocab_size <= 0:
        raise DataError(f"--vocab-size={vocab_size}: must be a positive integer")
    if not files:
        raise DataError("no .npy files given")
    splits: dict[str, dict] = {s: {"shards": [], "tokens": 0, "documents": 0, "bytes": None} for s in ("train", "val")}
    max_id = 0
    dtype = None
    for f in files:
        path = Path(f).resolve()
        arr = open_tokens(path, npy_dtype)
        dtype = dtype or arr.dtype
        if arr.dtype != dtype:
            raise DataError(f"{path}: dtype {arr.dtype} differs from the other files' {dtype}")
        n_val = int(arr.size * val_fraction)
        max_id = max(max_id, int(arr.max()))
        for split, start, n in (("train", 0, arr.size - n_val), ("val", arr.size - n_val, n_val)):
            if n > 0:
                splits[split]["shards"].append({"file": str(path), "offset": start, "tokens": n, "npy_dtype": npy_dtype})
                splits[split]["tokens"] += n
    vocab = vocab_size or max_id + 1
    if max_id >= vocab:
        raise DataError(f"token id {max_id} in the .npy files is >= --vocab-size {vocab}")
    out = _make_out(out)
    index = {
        "format": FORMAT_VERSION, "kind": "npy", "dtype": dtype.name, "vocab_size": vocab,
        "eot_id": eot_id, "tokenizer": None, "tokenizer_sha256": None,
        "val_fraction": val_fraction, "sources": [str(f) for f in files], "splits": splits,
    }
    _swap_index(out, index)
    return index


def open_tokens(path: Path, npy_dtype: str = "uint16") -> np.ndarray:
    """A token file as a read-only memmap: a real ``.npy`` (header) or a raw array."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 1 or arr.dtype.kind not in "ui":
            raise DataError(f"{path}: expected a 1-D integer token array, got {arr.dtype} {arr.shape}")
        return arr
    itemsize = np.dtype(npy_dtype).itemsize
    if path.stat().st_size % itemsize:
        raise DataError(f"{path}: {path.stat().st_size} bytes is not a whole number of {npy_dtype} "
                        f"tokens (not a raw token file? choose --npy-dtype)")
    return np.memmap(path, dtype=np.dtype(npy_dtype), mode="r")


def _write_index(out: Path, index: dict) -> None:
    tmp = out / f".tmp-{INDEX}"
    with open(tmp, "w") as f:
        f.write(json.dumps(index, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / INDEX)
