"""Execution of MiLo weights: the ``milo::`` custom ops and their per-device implementations."""

from milo_tensor.ops import library as _library  # noqa: F401  (registers the ops)
from milo_tensor.ops.reference import dequantize_int3

__all__ = ["dequantize_int3"]
