"""jaxft: fine-tune Llama-family models with JAX, fully or with PEFT methods."""

from jaxft.errors import CheckpointError, ConfigError, DataError, JaxftError

__version__ = "0.1.0"

__all__ = ["JaxftError", "ConfigError", "DataError", "CheckpointError", "__version__"]
