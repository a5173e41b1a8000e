"""A dataset rebuilt offline from a committed spec, checked against a committed manifest.

    ultramem data build --spec experiments/data/code.json --out data/code [--train-tokenizer]

The spec (JSON) names installed Python packages whose source files are the corpus (one
document per file, read as :func:`ultramem.data.corpus.read_source_tree` reads a tree), a
tokenizer file, the probe data to mix in and the manifest path; every path is relative to the
spec's folder::

    {"packages": [{"module": "torch", "dist": "torch"}, ...],
     "tokenizer": "code-tokenizer.json", "tokenizer_vocab": 8192, "tokenizer_sample_every": 8,
     "manifest": "code-manifest.json", "files": "code-files.txt.gz",
     "val_fraction": 0.01, "min_train_tokens": 100000000,
     "probes": {"people": 360, "bio_repeats": 40, "in_context": 4000, "seed": 0}}

A package that is not importable is an error naming it (nothing is guessed). The tokenizer is
used when the file exists; otherwise ``--train-tokenizer`` trains it on every
``tokenizer_sample_every``-th source file and writes it there. The probe documents
(:func:`ultramem.eval.probes.training_documents`) always go to the training split.

The manifest records each package's version, file count, bytes and the sha256 of its file
list (path and content hash of every file; the list itself is written gzipped to ``files``),
the tokenizer's sha256 and, per split, tokens, documents and the sha256 of the token stream.
When the manifest exists, a build that differs from it in any of these stops with one line
naming the first differences (``--write-manifest`` records the new build instead).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ultramem.data.corpus import Document, read_source_tree
from ultramem.data.prepare import prepare_documents
from ultramem.data.tokenizer import Tokenizer, train_tokenizer
from ultramem.errors import DataError
from ultramem.eval.probes import training_documents


def load_spec(path: str | Path) -> tuple[dict[str, Any], Path]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--spec {p}: no such file")
    try:
        spec = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for key in ("packages", "tokenizer", "manifest"):
        if key not in spec:
            raise DataError(f"{p}: missing {key!r}")
    return spec, p.parent


def package_dirs(packages: list[dict[str, str]]) -> list[tuple[dict[str, str], Path, str | None]]:
    """``(entry, source dir, version)`` of every package; DataError naming the missing ones."""
    out, missing = [], []
    for entry in packages:
        try:
            found = importlib.util.find_spec(entry["module"])
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            missing.append(entry["module"])
            continue
        version = None
        if entry.get("dist"):
            try:
                version = importlib.metadata.version(entry["dist"])
            except importlib.metadata.PackageNotFoundError:
                version = None
        out.append((entry, Path(next(iter(found.submodule_search_locations))), version))
    if missing:
        raise DataError(f"packages not installed in this Python ({platform.python_version()}): "
                        f"{', '.join(missing)}; install them or remove them from the spec")
    return out


def _source_docs(dirs: list[tuple[dict[str, str], Path, str | None]], record: dict[str, Any] | None) -> Iterator[Document]:
    """Every package's files as documents ``module/relpath``; fills ``record`` (per-package
    stats and the file list) when given."""
    for entry, root, version in dirs:
        mod = entry["module"]
        listing = hashlib.sha256()
        stats = {"module": mod, "dist": entry.get("dist"), "version": version, "files": 0, "bytes": 0}
        for doc in read_source_tree(root):
            if record is not None:
                h = hashlib.sha256(doc.text.encode("utf-8")).hexdigest()[:16]
                line = f"{mod}/{doc.doc_id}\t{h}\n"
                listing.update(line.encode())
                record["files"].append(line)
                stats["files"] += 1
                stats["bytes"] += len(doc.text.encode("utf-8"))
            yield Document(f"{mod}/{doc.doc_id}", doc.text)
        if record is not None:
            stats["files_sha256"] = listing.hexdigest()
            record["packages"].append(stats)


def _probe_docs(probes: dict[str, int]) -> list[Document]:
    texts = training_documents(probes["people"], probes["bio_repeats"], probes["in_context"], probes.get("seed", 0))
    return [Document(f"probe:{i}", t, split="train") for i, t in enumerate(texts)]


def stream_sha256(out: Path, split: dict[str, Any]) -> str:
    """sha256 of a split's token stream (its shards' bytes in order)."""
    h = hashlib.sha256()
    for shard in split["shards"]:
        with open(out / shard["file"], "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def build(spec_path: str | Path, out: str | Path, train_tok: bool = False, write_manifest: bool = False,
          progress: bool = False) -> dict[str, Any]:
    """Build the dataset of ``spec_path`` into ``out``; returns the manifest of this build."""
    spec, base = load_spec(spec_path)
    dirs = package_dirs(spec["packages"])
    tok_path = base / spec["tokenizer"]
    if not tok_path.is_file():
        if not train_tok:
            raise DataError(f"{tok_path}: tokenizer missing; pass --train-tokenizer to train it from the spec's sources")
        every = int(spec.get("tokenizer_sample_every", 8))
        sample = (d.text for i, d in enumerate(_source_docs(dirs, None)) if i % every == 0)
        train_tokenizer(sample, int(spec.get("tokenizer_vocab", 8192))).save(str(tok_path))
    tok = Tokenizer(tok_path)
    record: dict[str, Any] = {"packages": [], "files": []}
    probes = spec.get("probes")

    def docs() -> Iterator[Document]:
        yield from _source_docs(dirs, record)
        if probes:
            yield from _probe_docs(probes)

    index = prepare_documents(docs(), out, tok, float(spec.get("val_fraction", 0.01)),
                              sources=[e["module"] for e, _, _ in dirs], progress=progress)
    out = Path(out)
    splits = {s: {"tokens": d["tokens"], "documents": d["documents"], "bytes": d["bytes"],
                  "sha256": stream_sha256(out, d)} for s, d in index["splits"].items()}
    manifest = {"spec": Path(spec_path).name, "python": platform.python_version(),
                "packages": record["packages"], "probes": probes, "tokenizer_sha256": tok.sha256(),
                "vocab_size": tok.vocab_size, "val_fraction": index["val_fraction"], "splits": splits}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    need = int(spec.get("min_train_tokens", 0))
    if splits["train"]["tokens"] < need:
        raise DataError(f"{out}: {splits['train']['tokens']:,} train tokens, the spec asks for >= {need:,}; "
                        f"add packages to {spec_path}")
    committed = base / spec["manifest"]
    if committed.is_file() and not write_manifest:
        diff = manifest_diff(json.loads(committed.read_text()), manifest)
        if diff:
            raise DataError(f"the build in {out} differs from {committed}: {'; '.join(diff[:4])}"
                            f"{f' (+{len(diff) - 4} more)' if len(diff) > 4 else ''}; "
                            f"pass --write-manifest to record this build instead")
    else:
        committed.write_text(json.dumps(manifest, indent=1) + "\n")
        if spec.get("files"):
            with gzip.open(base / spec["files"], "wt", encoding="utf-8", compresslevel=9) as f:
                f.writelines(record["files"])
    return manifest


def manifest_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences that make two builds unequal (empty: the same data)."""
    diff = []
    olds = {p["module"]: p for p in old.get("packages", [])}
    for p in new["packages"]:
        o = olds.pop(p["module"], None)
        if o is None:
            diff.append(f"package {p['module']} is new")
            continue
        for k in ("version", "files", "bytes", "files_sha256"):
            if o.get(k) != p.get(k):
                diff.append(f"{p['module']} {k} {o.get(k)} -> {p.get(k)}")
    diff += [f"package {m} is gone" for m in olds]
    if old.get("tokenizer_sha256") != new["tokenizer_sha256"]:
        diff.append("tokenizer sha256 differs")
    if old.get("probes") != new.get("probes"):
        diff.append("probe settings differ")
    for s, d in new["splits"].items():
        o = old.get("splits", {}).get(s, {})
        if o.get("sha256") != d["sha256"]:
            diff.append(f"{s} token stream sha256 differs ({o.get('tokens')} -> {d['tokens']} tokens)")
    return diff
