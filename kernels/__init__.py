"""Triton kernels of fastaspp."""
