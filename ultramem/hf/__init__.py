"""Hugging Face integration: config/model classes, export, registration with the Auto classes.

Importing this package does not import transformers: :func:`register` does, and ``import
ultramem`` arranges for it to run as soon as transformers is imported (:mod:`ultramem.hf.hook`).
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type = "ultramem"`` (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    from ultramem.hf.configuration_ultramem import UltramemConfig  # noqa: PLC0415
    from ultramem.hf.modeling_ultramem import UltramemForCausalLM  # noqa: PLC0415

    AutoConfig.register("ultramem", UltramemConfig, exist_ok=True)
    AutoModelForCausalLM.register(UltramemConfig, UltramemForCausalLM, exist_ok=True)
    _registered = True
