"""Triton kernels for CUDA (and the Triton interpreter in tests)."""
