"""What the Hugging Face wrapper needs of ultramem, in one place.

In this package it is ultramem itself (Triton kernels where they run). ``ultramem export`` copies
this file, with every module it imports, into the exported directory as flat files with relative
imports (``um_*.py``, the kernels left out), and writes a small ``ultramem_backend.py`` there that
takes the installed ultramem when its version matches and the copy otherwise.
"""

from __future__ import annotations

from typing import Any

from ultramem.config import ModelConfig, from_dict
from ultramem.model.decode_state import DecodeState
from ultramem.model.transformer import Transformer

BACKEND = "ultramem"  # the exported switch says "reference copy" when it takes the copy

__all__ = ["BACKEND", "ModelConfig", "Transformer", "model_config", "new_decode_state"]


def model_config(d: dict[str, Any]) -> ModelConfig:
    """The nested ``ultramem`` dict of a Hugging Face config -> a validated ``ModelConfig``."""
    cfg = from_dict(ModelConfig, d, "model.")
    cfg.validate()
    return cfg


def new_decode_state(model: Transformer, batch: int) -> DecodeState:
    """A zeroed decode state of ``batch`` sequences up to the model's context, for
    ``Transformer.forward(..., state=...)`` (KV cache and every layer's decode state)."""
    return DecodeState.allocate(model, batch)
