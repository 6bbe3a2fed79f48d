"""Execution of MiLo weights: the ``milo::`` custom ops and their per-device implementations.

Importing this package registers the ops (schemas, fake and reference impls). When a CUDA GPU is
visible it also loads the CUDA kernels (``milo_tensor.ops.cuda.load_extension``: a prebuilt
``milo_tensor._C`` or a just-in-time build of ``csrc/``); on a CPU-only torch or without a GPU this
is skipped, and a failed load only warns once and leaves the reference implementation serving
the ops. Set ``MILO_NO_CUDA_EXT=1`` to skip the load altogether.
"""

import os as _os

from milo_tensor.ops import library as _library  # noqa: F401  (registers the ops)
from milo_tensor.ops.reference import dequantize_int3

__all__ = ["dequantize_int3"]


def _maybe_load_cuda() -> None:
    if _os.environ.get("MILO_NO_CUDA_EXT", "") not in ("", "0"):
        return
    try:
        import torch

        if not torch.version.cuda or not torch.cuda.is_available():
            return
        from milo_tensor.ops.cuda import load_extension

        load_extension()  # never raises; warns once on failure
    except Exception as e:  # pragma: no cover - belt and braces: importing ops never fails
        import warnings

        warnings.warn(f"milo_tensor: CUDA kernels unavailable ({type(e).__name__}: {e})", RuntimeWarning)


_maybe_load_cuda()
