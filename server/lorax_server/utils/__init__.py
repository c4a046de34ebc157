"""Helpers: hub downloads, checkpoint conversion, weight access, detokenization."""
