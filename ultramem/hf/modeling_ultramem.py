"""Hugging Face causal-LM wrapper of the ultramem ``Transformer`` (every layer type).

``UltramemForCausalLM(config)`` holds ``self.model``, the ultramem ``Transformer`` built from
``config.ultramem``; weights are its state dict under ``model.``. ``generate()`` works with
:class:`UltramemCache`, which wraps ultramem's own decode state (KV cache, query-conv windows):
the prompt is run once, then one token per step, as ``ultramem generate`` does.

Limits: no left padding (the model takes no attention mask: right-padded batches without a cache
are exact at every real position, which is what scoring needs), one token per decode step after
the prefill, no beam search (the cache cannot be reordered), no ``inputs_embeds``.

This file is copied verbatim into every exported directory; it imports ultramem only through
``ultramem_backend`` (installed ultramem or the exported copy of its modules).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .configuration_ultramem import UltramemConfig
from .ultramem_backend import Transformer, model_config, new_decode_state

# the output field generate() reads the cache from: ``past_key_values``, renamed ``cache`` in
# later transformers 5.x releases
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class UltramemCache:
    """One sequence batch's decode state, with the few members ``generate()`` reads of a cache."""

    is_compileable = False
    is_linear = (False,)

    def __init__(self) -> None:
        self.state = None  # ultramem's decode state, allocated by the first forward (its batch)
        self.seen = 0  # tokens already run through the model

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


def _check_mask(mask: torch.Tensor | None, cache: UltramemCache | None) -> None:
    if mask is None or bool(mask.all()):
        return
    m = mask.bool()
    if bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError("ultramem models take no attention mask: pad on the right "
                         "(tokenizer.padding_side = 'right'), not on the left")
    if cache is not None:
        raise ValueError("ultramem models cannot decode a padded batch with the cache; "
                         "generate one sequence (or equal-length prompts) at a time")


class UltramemForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = UltramemConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # the cache cannot be cropped: no assisted generation
    _supports_cache_class = False
    _no_split_modules: list[str] = []

    def __init__(self, config: UltramemConfig) -> None:
        super().__init__(config)
        self.model = Transformer(model_config(config.ultramem))
        if not self.model.embed_tokens.weight.is_meta:  # a fresh model; from_pretrained loads
            self.model.init_weights()
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not make a DynamicCache: the model makes its own

    def _init_weights(self, module: torch.nn.Module) -> None:
        """transformers calls this after loading for every module whose tensors were not all in
        the file: only derived, unsaved buffers (RoPE tables, V2 window offsets, coverage
        counters) are recomputed; a fresh model was initialised in ``__init__``."""
        fn = getattr(module, "init_buffers", None)
        if callable(fn) and not any(b.is_meta for b in module.buffers(recurse=False)):
            fn()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: UltramemCache | None = None,
        past_key_values: UltramemCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MoeCausalLMOutputWithPast:
        """``input_ids [B, S]`` -> logits ``[B, S, V]``; ``labels [B, S]`` (shifted inside,
        -100 ignored) add the LM loss plus, in training, the layers' weighted aux losses."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("ultramem models take input_ids (inputs_embeds is not supported)")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = UltramemCache()
        _check_mask(attention_mask, cache)
        if cache is not None and cache.state is None:
            cache.state = new_decode_state(self.model, input_ids.shape[0])
        out = self.model(input_ids, state=cache.state if cache is not None else None)
        if cache is not None:
            cache.seen += input_ids.shape[1]
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].flatten(0, 1).float()
            loss = F.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)
            if self.training and out.aux_loss is not None:
                loss = loss + out.aux_loss
        return MoeCausalLMOutputWithPast(loss=loss, logits=out.logits, aux_loss=out.aux_loss,
                                         **{_CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> dict[str, Any]:
        """Feed only the tokens the cache has not seen (the whole prompt first, then one)."""
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")
        if cache is not None:
            input_ids = input_ids[:, cache.seen:]
        return {"input_ids": input_ids, "cache": cache, "use_cache": kwargs.get("use_cache", True),
                "attention_mask": kwargs.get("attention_mask") if cache is None else None}
