"""fastaspp: fused atrous convolution and ASPP kernels for DeepLabV3.

Backends: see fastaspp.backends(), fastaspp.backend(name), fastaspp.set_backend(name).
"""
from fastaspp import _ext  # noqa: F401  (loads fastaspp._C first: its ops are registered before Python's)
from fastaspp._backend import BACKENDS, backend, backends, get_backend, resolve_backend, set_backend
from fastaspp import ops, nn, reference, models
from fastaspp.convert import convert

__version__ = "0.1.0"
__all__ = ["BACKENDS", "backend", "backends", "get_backend", "resolve_backend", "set_backend",
           "ops", "nn", "reference", "models", "convert"]
