"""ultramem: language models with ultra-sparse memory layers (UltraMem, UltraMemV2) and baselines."""

from ultramem.config import Config, ModelConfig, load_config
from ultramem.errors import ConfigError

__version__ = "0.1.0"

# AutoConfig / AutoModelForCausalLM learn model_type "ultramem" once transformers is imported
# (transformers is not imported here; see ultramem.hf.hook)
from ultramem.hf import hook as _hf_hook  # noqa: E402

_hf_hook.install()
__all__ = ["Config", "ConfigError", "ModelConfig", "load_config", "__version__"]
