"""Serving: the continuous-batching engine behind `python -m jaxft.serve`."""
