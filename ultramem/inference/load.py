"""Load a trained run: its config, latest (verified) checkpoint and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ultramem import checkpoint as ckpt
from ultramem.config import Config
from ultramem.data.tokenizer import Tokenizer
from ultramem.errors import CheckpointError, DataError
from ultramem.model.transformer import Transformer


@dataclass
class LoadedRun:
    cfg: Config
    model: Transformer
    tokenizer: Tokenizer | None
    checkpoint: Path
    step: int


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", checkpoint: str | Path | None = None) -> LoadedRun:
    from ultramem.distributed import checkpoint as dckpt  # noqa: PLC0415 -- torch's DCP: ~1 s of start-up

    run_dir = Path(run_dir)
    path = Path(checkpoint) if checkpoint else dckpt.latest_any(run_dir)  # full or DCP (sharded runs)
    if path is None:
        raise CheckpointError(f"{run_dir}: no checkpoint (checkpoints/step_*/ or dcp/step_*/ with a manifest)")
    cfg = Config.from_dict(ckpt.read_config(path))
    model = Transformer.build(cfg.model, device)
    state = dckpt.load_any(path, model)
    model.eval()
    tok_path = run_dir / "tokenizer.json"
    tokenizer = Tokenizer(tok_path) if tok_path.is_file() else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.model.vocab_size:
        raise DataError(f"tokenizer/model vocabulary mismatch: {tok_path} has {tokenizer.vocab_size} "
                        f"tokens, the model {cfg.model.vocab_size}")
    return LoadedRun(cfg, model, tokenizer, path, state["step"])
