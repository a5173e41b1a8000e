"""Training-mode causality of every run of the family experiments on this machine's kernels
(issue 13 item 1): ``ultramem.eval.causality.check_causality`` with bf16 autocast on CUDA,
random weights at the runs' exact sizes, B x S tokens as in training, forward and backward.

    python benchmarks/explore/quality_causality.py --out causality.json [--experiments v2-family v1-family]

Writes the JSON after every model (an interrupted call keeps what finished).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ultramem.eval.causality import check_causality
from ultramem.experiment import find_experiment, load_experiment, run_configs
from ultramem.model.transformer import Transformer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--experiments", nargs="*", default=["v2-family", "v1-family"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--cut", type=int, default=517)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--overrides", nargs="*", default=[], help="extra overrides (CPU smoke tests: small sizes)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else None
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "command": "python benchmarks/explore/quality_causality.py " + " ".join(
               ["--out", args.out, "--experiments", *args.experiments]),
           "batch": args.batch, "seq": args.seq, "cut": args.cut, "models": []}
    for name in args.experiments:
        spec = load_experiment(find_experiment(name))
        for run, cfg in run_configs(spec, args.overrides):
            t0 = time.perf_counter()
            torch.manual_seed(0)
            model = Transformer.build(cfg.model, dev)
            idx = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq), device=dev)
            rep = check_causality(model, idx, args.cut, autocast=autocast, rel=1e-2 if autocast else 1e-5)
            row = {"experiment": name, "run": run["name"], "seconds": round(time.perf_counter() - t0, 1), **rep}
            res["models"].append(row)
            print(json.dumps({k: row[k] for k in ("experiment", "run", "leak", "seconds")}),
                  {k: (f"{row[k]['perturbed']:.2e}", f"{row[k]['repeat']:.2e}", f"{row[k]['scale']:.2e}")
                   for k in ("logits", "embed_grad", "param_grad")}, flush=True)
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
