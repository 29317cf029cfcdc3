"""The shipped configs: `--config=NAME[:ARG]` (or `configs/NAME.py[:ARG]` from a checkout)
loads jaxft/configs/NAME.py. Config files are loaded by path (jaxft.configlib), not imported."""
