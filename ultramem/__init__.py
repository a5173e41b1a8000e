"""ultramem: language models with ultra-sparse memory layers (UltraMem, UltraMemV2) and baselines."""

from ultramem.config import Config, ModelConfig
from ultramem.errors import ConfigError
from ultramem.resolve import load_config

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "ModelConfig", "load_config", "__version__"]
