"""Architectures: a registry of small specs over the shared decoder in `transformer.py`."""
