"""``ultramem export``: a trained run -> a Hugging Face model directory.

    ultramem export runs/tiny-ultramem --out hf/tiny-ultramem [--dtype bf16] [--force]

Writes ``config.json`` (``model_type = "ultramem"``, ``auto_map``), ``configuration_ultramem.py``,
``modeling_ultramem.py``, ``ultramem_backend.py`` and the flat copy of ultramem's modules
(``um_*.py``, :mod:`ultramem.hf.flatten`), ``model.safetensors``, the tokenizer files,
``generation_config.json`` and a model card (``README.md``). Everything goes into a temporary
directory renamed into place at the end, so an interrupted export leaves no half directory.
Needs no transformers: loading the result does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import ultramem
from ultramem.data.corpus import EOT
from ultramem.errors import CheckpointError, ConfigError
from ultramem.hf import card, flatten
from ultramem.inference.load import load_run

HF_DIR = Path(__file__).resolve().parent
CODE_FILES = ("configuration_ultramem.py", "modeling_ultramem.py")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hf_config(model_cfg: dict, dtype: str, eot_id: int) -> dict:
    """The ``config.json`` a ``UltramemConfig`` reads (written without transformers)."""
    return {
        "model_type": "ultramem",
        "architectures": ["UltramemForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_ultramem.UltramemConfig",
            "AutoModelForCausalLM": "modeling_ultramem.UltramemForCausalLM",
        },
        "ultramem": model_cfg,
        "vocab_size": model_cfg["vocab_size"],
        "hidden_size": model_cfg["d_model"],
        "num_hidden_layers": model_cfg["n_layers"],
        "num_attention_heads": model_cfg["n_heads"],
        "max_position_embeddings": model_cfg["max_seq_len"],
        "bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id,
        "tie_word_embeddings": False,
        "dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype],
        "ultramem_version": ultramem.__version__,
    }


def tokenizer_files(tokenizer_json: Path, out: Path, max_len: int) -> None:
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_len,
        "padding_side": "right", "clean_up_tokenization_spaces": False, "add_bos_token": False,
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def weights(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``model.`` + the Transformer's state dict; floating tensors cast to ``dtype``."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        out[f"model.{k}"] = (v.to(dtype) if v.is_floating_point() else v).contiguous().clone()
    return out


def export_run(run_dir: str | Path, out: str | Path, dtype: str = "fp32", force: bool = False,
               checkpoint: str | Path | None = None) -> Path:
    """Export the run's latest (verified) checkpoint to the directory ``out``; returns it."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not force:
        raise ConfigError(f"--out {out} exists; pass --force to replace it")
    loaded = load_run(run_dir, "cpu", checkpoint)
    tok_json = run_dir / "tokenizer.json"
    if loaded.tokenizer is None:
        raise CheckpointError(f"{run_dir}: no tokenizer.json; the export needs the run's tokenizer")
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = flatten.write_flat_copy(tmp)
        (tmp / "ultramem_backend.py").write_text(flatten.backend_switch(files, ultramem.__version__))
        for name in CODE_FILES:
            shutil.copyfile(HF_DIR / name, tmp / name)
        cfg = loaded.cfg
        (tmp / "config.json").write_text(json.dumps(
            hf_config(cfg.to_dict()["model"], dtype, loaded.tokenizer.eot_id), indent=2) + "\n")
        eot = loaded.tokenizer.eot_id
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}, indent=2) + "\n")
        save_file(weights(loaded.model, DTYPES[dtype]), str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "ultramem_step": str(loaded.step)})
        tokenizer_files(tok_json, tmp, cfg.model.max_seq_len)
        (tmp / "README.md").write_text(card.model_card(cfg, run_dir, loaded.step, dtype, out.name))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run as a Hugging Face model directory")
    p.add_argument("run", help="run directory (its latest verified checkpoint is exported)")
    p.add_argument("--out", required=True, help="directory to write (must not exist unless --force)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights dtype (default fp32)")
    p.add_argument("--checkpoint", help="a checkpoint directory instead of the latest")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = export_run(args.run, args.out, args.dtype, args.force, args.checkpoint)
    print(f"exported {args.run} -> {out} (load with AutoModelForCausalLM.from_pretrained"
          f"({str(out)!r}, trust_remote_code=True))")
    return 0
