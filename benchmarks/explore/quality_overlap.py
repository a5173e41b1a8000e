"""Train/validation overlap of the code set (issue 13 item 1): how much of the validation text
a model could have memorised, and where each run's loss comes from.

For every validation target token ``j`` the n-gram ``stream[j-n+1 .. j]`` (ending with the
target) is looked up among all n-grams of the training stream (64-bit rolling hashes, exact
up to hash collisions, ~1e-9 here). Reported for the slice the training curves evaluate
(``train.eval_batches`` x batch x seq_len first targets) and for the whole split, per
document (names from the committed file list) and, given runs' ``val_token_losses.npy``
(``"after": {"val_full": true}``), each run's mean loss on covered and uncovered targets.

    python benchmarks/explore/quality_overlap.py --data data/code --out overlap.json \
        [--runs runs/v2/runs/*] [--slice 131072]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

from ultramem.data.index import load_index
from ultramem.data.loader import split_tokens

P = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the rolling hash


def ngram_hashes(t: np.ndarray, n: int) -> np.ndarray:
    """``h[j] = hash(t[j .. j+n-1])`` for ``j < len(t) - n + 1`` (uint64, wrapping): the
    polynomial ``sum_i (t[j+i] + 1) P^(n-1-i)``, built by doubling (``n`` a power of two)."""
    if n & (n - 1):
        raise ValueError(f"n={n} must be a power of two")
    h = t.astype(np.uint64) + np.uint64(1)
    k, pk = 1, P
    with np.errstate(over="ignore"):
        while k < n:  # h_2k[j] = h_k[j] P^k + h_k[j + k]
            h = h[:-k] * pk + h[k:]
            k, pk = 2 * k, pk * pk
    return h


def covered(train: np.ndarray, val: np.ndarray, n: int) -> np.ndarray:
    """``c[i]`` for val target ``i + 1`` (the stream minus its first token): the n-gram ending
    at it occurs in train. Targets with fewer than n tokens of context before them: False."""
    table = np.unique(ngram_hashes(train, n))
    hv = ngram_hashes(val, n)  # hv[j] ends at val[j + n - 1]
    pos = np.searchsorted(table, hv)
    hit = table[np.minimum(pos, len(table) - 1)] == hv
    out = np.zeros(len(val) - 1, dtype=bool)  # target i+1 -> index i
    out[n - 2:] = hit
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", nargs="*", default=[])
    ap.add_argument("--slice", type=int, default=8 * 16 * 1024, help="targets the training curves evaluate")
    ap.add_argument("--n", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--files", default="experiments/data/code-files.txt.gz")
    ap.add_argument("--cache", help="npz of the coverage masks: loaded when it exists, else written")
    args = ap.parse_args()
    train = np.concatenate([np.asarray(a) for a in split_tokens(args.data, "train")])
    val = np.concatenate([np.asarray(a) for a in split_tokens(args.data, "val")])
    eot = load_index(args.data)["eot_id"]
    doc = np.cumsum(val[:-1] == eot)  # document of target i + 1
    names = []
    if Path(args.files).is_file():  # the val documents in stream order: file-list entries with a val hash
        for line in gzip.open(args.files, "rt"):
            path, h = line.rstrip("\n").split("\t")
            if int(h, 16) < 0.01 * 2**64:
                names.append(path)
    res: dict = {"train_tokens": int(len(train)), "val_tokens": int(len(val)), "slice": args.slice, "n": {}}
    cov = {}
    cached = np.load(args.cache) if args.cache and Path(args.cache).is_file() else None
    for n in args.n:
        c = cached[f"n{n}"] if cached is not None else covered(train, val, n)
        cov[n] = c
        per_doc = np.bincount(doc, weights=c) / np.maximum(np.bincount(doc), 1)
        res["n"][n] = {"covered_full": float(c.mean()), "covered_slice": float(c[:args.slice].mean())}
        if n == 16:
            tok = np.bincount(doc)
            order = np.argsort(-tok)
            res["documents"] = [{"doc": int(d), "name": names[d] if d < len(names) else None,
                                 "targets": int(tok[d]), "covered16": round(float(per_doc[d]), 4),
                                 "in_slice": int(np.sum(doc[:args.slice] == d))} for d in order]
        print(n, res["n"][n], flush=True)
    if args.cache and cached is None:
        np.savez(args.cache, **{f"n{n}": c for n, c in cov.items()})
    docs_in_slice = np.unique(doc[:args.slice])
    res["slice_documents"] = [names[d] if d < len(names) else int(d) for d in docs_in_slice]
    runs = {}
    for r in args.runs:
        f = Path(r) / "val_token_losses.npy"
        if not f.is_file():
            continue
        loss = np.load(f).astype(np.float64)
        m = len(loss)
        row = {"full": float(loss.mean()), "slice": float(loss[:args.slice].mean())}
        for n, c in cov.items():
            c = c[:m]
            row[f"covered{n}"] = float(loss[c].mean())
            row[f"uncovered{n}"] = float(loss[~c].mean())
        runs[Path(r).name] = row
    res["runs"] = runs
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
