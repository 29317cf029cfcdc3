"""The shipped configs: `--config=NAME[:ARG]` (or `configs/NAME.py[:ARG]` from a checkout)
loads configs/NAME.py (installed as the package jaxft.configs). Config files are loaded by path (jaxft.configlib), not imported."""
