"""ultramem: language models with ultra-sparse memory layers (UltraMem, UltraMemV2) and baselines."""

from ultramem.config import Config, ModelConfig
from ultramem.errors import ConfigError
from ultramem.resolve import load_config

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "ModelConfig", "generate", "load_config", "__version__"]

# AutoConfig / AutoModelForCausalLM learn model_type "ultramem" once transformers is imported
# (transformers is not imported here; see ultramem.hf.hook)
from ultramem.hf import hook as _hf_hook  # noqa: E402

_hf_hook.install()


def __getattr__(name: str):
    if name == "generate":  # lazy: the inference engine is not needed to configure or train
        from ultramem.inference.generate import generate  # noqa: PLC0415

        return generate
    raise AttributeError(f"module 'ultramem' has no attribute {name!r}")
