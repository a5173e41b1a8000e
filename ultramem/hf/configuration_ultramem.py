"""Hugging Face config of an ultramem model (``model_type = "ultramem"``).

The whole ultramem ``ModelConfig`` travels as one nested dict under ``ultramem`` (layer configs
keep their ``"type"`` key); the standard Hugging Face names (``vocab_size``, ``hidden_size``,
``num_hidden_layers``, ``num_attention_heads``, ``max_position_embeddings``) are derived from it,
so tools that read those (lm-evaluation-harness reads the context length) see the right values.

This file is copied verbatim into every exported directory (``ultramem export``): it imports
nothing of ultramem.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class UltramemConfig(PretrainedConfig):
    model_type = "ultramem"

    def __init__(self, ultramem: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.ultramem = dict(ultramem or {})
        m = self.ultramem
        # derived: whatever a saved config.json holds for these, the nested config wins
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings"):
            kwargs.pop(key, None)
        self.vocab_size = int(m.get("vocab_size", 50432))
        self.hidden_size = int(m.get("d_model", 1024))
        self.num_hidden_layers = int(m.get("n_layers", 12))
        self.num_attention_heads = int(m.get("n_heads", 16))
        self.max_position_embeddings = int(m.get("max_seq_len", 2048))
        # ultramem ties the LM head inside its own model (no separate head module to tie)
        kwargs["tie_word_embeddings"] = False
        kwargs.setdefault("bos_token_id", 0)
        kwargs.setdefault("eos_token_id", 0)
        super().__init__(**kwargs)
