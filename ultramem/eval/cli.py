"""``ultramem eval``: validation loss and bits per byte of a trained run.

    ultramem eval runs/tiny-dense                       # the run's own validation split
    ultramem eval runs/tiny-dense --data data/other     # a prepared dataset's val split
    ultramem eval runs/tiny-dense --data notes.txt --json   # any text file (whole file)

A loss that is not finite (a checkpoint with NaN weights) is an error, never a ``NaN`` in the
output; ``--json`` always prints valid JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from ultramem.checkpoint import non_finite_tensors
from ultramem.cli_args import positive_int
from ultramem.data.corpus import read_file
from ultramem.data.index import INDEX, check_vocab, load_index, verify_shards
from ultramem.data.loader import TokenBatches
from ultramem.data.prepare import prepare_documents
from ultramem.errors import CheckpointError, DataError
from ultramem.eval import harness
from ultramem.eval.loss import bits_per_byte, evaluate_loss
from ultramem.inference.load import load_run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation loss and bits per byte of a run")
    p.add_argument("run", help="run directory (with --tasks: or an exported directory)")
    p.add_argument("--data", help="prepared dataset dir or a .txt/.jsonl file (default: the run's data)")
    p.add_argument("--split", default="val", help="split of a prepared dataset (default: val)")
    p.add_argument("--max-batches", type=positive_int, default=None, help="at most N batches (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--encoding", default="utf-8", help="encoding of a --data text file (default: utf-8)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    harness.add_arguments(p)  # --tasks: lm-evaluation-harness (ultramem.eval.harness)
    p.set_defaults(func=run)


def evaluate_run(run_dir: str, data: str | None = None, split: str = "val", max_batches: int | None = None,
                 batch_size: int = 8, device: str = "auto", encoding: str = "utf-8") -> dict:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    loaded = load_run(run_dir, dev)
    cfg = loaded.cfg
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(data or cfg.data.path)
        where = str(path)
        if path.is_file():  # a text file: tokenize it whole with the run's tokenizer
            if loaded.tokenizer is None:
                raise DataError(f"{run_dir}: no tokenizer.json to tokenize {path}")
            prepare_documents(read_file(path, encoding=encoding), tmp, loaded.tokenizer, val_fraction=0.0)
            path, split = Path(tmp), "train"
        elif not (path / INDEX).is_file():
            raise DataError(f"{path}: neither a file nor a prepared dataset")
        else:
            verify_shards(path, load_index(path), (split,))
        index = load_index(path)
        check_vocab(index, cfg.model.vocab_size, f"dataset {where}")
        if loaded.tokenizer is not None and index.get("tokenizer_sha256") not in (None, loaded.tokenizer.sha256()):
            raise DataError(f"{where} was tokenized with a different tokenizer than {run_dir}")
        try:
            batches = TokenBatches(path, split, cfg.data.seq_len, batch_size, shuffle=False,
                                   vocab_size=cfg.model.vocab_size)
        except DataError as e:  # name the user's file, not the temporary directory
            raise DataError(str(e).replace(str(path), where)) from None
        loss, n = evaluate_loss(loaded.model, batches, dev, cfg.train.dtype, max_batches)
        sp = index["splits"][split]
    if not math.isfinite(loss):
        bad = non_finite_tensors(loaded.model.state_dict())
        why = (f"{len(bad)} weight tensors hold NaN/inf ({', '.join(bad[:3])})" if bad
               else "the weights are finite; the forward pass overflowed")
        raise CheckpointError(f"{loaded.checkpoint}: the loss on {where} is {loss}: {why}")
    return {"run": str(run_dir), "step": loaded.step, "data": str(data or cfg.data.path), "split": split,
            "tokens": n, "loss": loss, "bits_per_byte": bits_per_byte(loss, n, sp["tokens"], sp["bytes"])}


def run(args: argparse.Namespace) -> int:
    if args.tasks:
        return harness.run(args)
    res = evaluate_run(args.run, args.data, args.split, args.max_batches, args.batch_size, args.device,
                       args.encoding)
    if args.json:
        print(json.dumps(res, allow_nan=False))
    else:
        bpb = "n/a" if res["bits_per_byte"] is None else f"{res['bits_per_byte']:.4f}"
        print(f"{res['run']} (step {res['step']}) on {res['data']} [{res['split']}, {res['tokens']} tokens]: "
              f"loss {res['loss']:.4f} nats/token, {bpb} bits/byte")
    return 0
