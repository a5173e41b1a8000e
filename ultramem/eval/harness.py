"""``ultramem eval RUN|DIR --tasks ...``: lm-evaluation-harness on a run or an exported model.

    ultramem eval runs/tiny-ultramem --tasks ultramem_corpus_recall,ultramem_kv_recall
    ultramem eval hf/tiny-ultramem --tasks hellaswag,arc_easy --limit 500   # needs network for data

RUN (a training run directory) is wrapped in the Hugging Face class in memory, no export needed;
DIR (an ``ultramem export`` directory) is loaded with ``AutoModelForCausalLM``. The local tasks
(``ultramem_*``, :mod:`ultramem.eval.harness_data`) need no network; any other task name is
looked up in lm-eval's own registry (its data comes from the Hugging Face hub). Needs
``pip install "ultramem[eval]"`` (lm-eval, transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ultramem.data.corpus import EOT
from ultramem.errors import ConfigError, DataError
from ultramem.eval.harness_data import asset_dir
from ultramem.hf import register
from ultramem.inference.load import load_run

LOCAL_TASKS = ("ultramem_corpus_recall", "ultramem_kv_recall")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("lm-evaluation-harness (with --tasks; RUN may also be an exported directory)")
    g.add_argument("--tasks", help=f"comma-separated task names (local: {', '.join(LOCAL_TASKS)})")
    g.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction)")
    g.add_argument("--num-fewshot", type=int, default=None)
    g.add_argument("--output", help="write the results JSON here")


def _write_local_tasks(dest: Path) -> None:
    src = asset_dir()
    for name in LOCAL_TASKS:
        text = (src / f"{name}.yaml").read_text().replace("__DATA__", str(src))
        (dest / f"{name}.yaml").write_text(text)


def load_model(path: str | Path, device: str) -> tuple[Any, Any]:
    """(Hugging Face model, tokenizer) for a run directory or an exported directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: PLC0415


    register()
    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
    else:
        from ultramem.hf.configuration_ultramem import UltramemConfig  # noqa: PLC0415
        from ultramem.hf.modeling_ultramem import UltramemForCausalLM  # noqa: PLC0415

        loaded = load_run(path, "cpu")
        if loaded.tokenizer is None:
            raise DataError(f"{path}: no tokenizer.json; the harness needs the run's tokenizer")
        eot = loaded.tokenizer.eot_id
        config = UltramemConfig(ultramem=loaded.cfg.to_dict()["model"], bos_token_id=eot, eos_token_id=eot,
                                pad_token_id=eot)
        with torch.device("meta"):  # no init: the run's model replaces the empty one
            model = UltramemForCausalLM(config)
        model.model = loaded.model
        tok = PreTrainedTokenizerFast(tokenizer_file=str(loaded.tokenizer.path), bos_token=EOT, eos_token=EOT,
                                      unk_token=EOT, pad_token=EOT, model_max_length=loaded.cfg.model.max_seq_len)
    tok.padding_side = "right"  # the model takes no attention mask (see modeling_ultramem)
    return model.to(device).eval(), tok


def run_harness(path: str | Path, tasks: list[str], limit: float | None = None, batch_size: int = 8,
                device: str = "cpu", num_fewshot: int | None = None) -> dict[str, dict[str, float]]:
    """Run the tasks; returns ``{task: {metric: value}}`` (lm-eval's ``acc,none`` -> ``acc``)."""
    try:
        import lm_eval  # noqa: PLC0415
        from lm_eval.models.huggingface import HFLM  # noqa: PLC0415
        from lm_eval.tasks import TaskManager  # noqa: PLC0415
    except ImportError as e:
        raise ConfigError(f"--tasks needs lm-evaluation-harness: pip install 'ultramem[eval]' ({e})") from None
    model, tok = load_model(path, device)
    if limit is not None and limit >= 1:
        limit = int(limit)
    if all(t in LOCAL_TASKS for t in tasks):  # local json data: never ask the hub
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        _write_local_tasks(Path(tmp))
        manager = TaskManager(include_path=tmp)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ConfigError(f"--tasks: unknown task(s) {unknown}; local tasks: {', '.join(LOCAL_TASKS)}, "
                              "or any lm-eval task name (lm-eval --tasks list)")
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device,
                  max_length=model.config.max_position_embeddings)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False, bootstrap_iters=0)
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()  # "acc,none" -> "acc"
                         if "," in k and isinstance(v, (int, float)) and "_stderr" not in k}
    return results


def run(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    res = run_harness(args.run, tasks, args.limit, args.batch_size, device, args.num_fewshot)
    doc = {"model": str(args.run), "tasks": tasks, "limit": args.limit, "results": res}
    if args.output:
        Path(args.output).write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc))
        return 0
    for task, metrics in res.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
        print(f"{task}: {shown}", file=sys.stdout)
    return 0
