"""Loader for the CUDA kernels in ``milo_tensor/csrc``.

``load_extension()`` makes the CUDA implementation of the ``milo::`` ops available to the
dispatcher and says whether it did. The kernels register themselves from C++
(``TORCH_LIBRARY_IMPL(milo, CUDA, m)`` in ``csrc/int3_linear.cu``) as soon as the shared library is
loaded; the schemas come from ``milo_tensor/ops/library.py``. Order does not matter: an impl may be
registered before its schema.

1. a prebuilt ``milo_tensor._C`` (``pip install --no-build-isolation -e .`` on a machine with CUDA,
   see setup.py, or ``scripts/prebuild_ext.py`` elsewhere) is imported if present, unless a
   ``_C.sources.sha256`` beside it records other ``csrc/`` sources than the package has;
2. otherwise the sources are compiled just in time with ``torch.utils.cpp_extension.load`` (ninja,
   cached under the default torch extensions directory, so only the first call pays);
3. on a CPU-only torch build this is a silent no-op returning False; any other failure (no GPU, no
   CUDA toolkit, a compile error) gives one ``warnings.warn`` naming the cause and returns False,
   and the plain-torch reference implementation keeps serving the op. It never raises.

Environment:
    MILO_CUDA_ARCHS   semicolon/comma list of compute capabilities to build for, e.g. "90" or
                      "80;90" (default "80;90" plus PTX of the newest, so newer GPUs JIT it).
    MILO_NO_JIT=1     never compile at run time (use the prebuilt module or the reference).
    MILO_JIT_VERBOSE=1  show the compiler output.
"""

from __future__ import annotations

import glob
import hashlib
import os
import threading
import warnings

__all__ = ["load_extension", "extension_status", "sources_digest", "prebuilt_mismatch"]

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CSRC = os.path.join(_PKG, "csrc")
_LOCK = threading.Lock()
_STATE: bool | None = None
_REASON: str = "not loaded yet"


def extension_status() -> tuple[bool | None, str]:
    """(loaded?, how or why not). ``None`` while load_extension() has not run."""
    return _STATE, _REASON


def arch_flags(spec: str | None = None) -> list[str]:
    """nvcc -gencode flags for MILO_CUDA_ARCHS (also used by setup.py). Compute capability 9.0 is built as
    sm_90a, the arch-specific target whose wgmma tile 8 needs (an sm_90a binary runs on H100/H200 only,
    the GPUs of capability 9.0); the PTX of the newest target stays the portable compute_XX, so newer GPUs
    can JIT it (tile 8 is then compiled out and never launched there)."""
    if spec is None:
        spec = os.environ.get("MILO_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "").rstrip("a") for a in spec.replace(",", ";").split(";") if a.strip()]
    flags = []
    for a in archs:
        real = f"{a}a" if a == "90" else a
        flags.append(f"-gencode=arch=compute_{real},code=sm_{real}")
    if archs:
        newest = max(archs, key=lambda s: int("".join(ch for ch in s if ch.isdigit()) or 0))
        flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def sources_digest(csrc: str = _CSRC) -> str:
    """sha256 over the names and contents of the files in ``csrc``. A library built away from the package
    (scripts/prebuild_ext.py, for a GPU machine) records it in ``_C.sources.sha256``, so that it serves only
    the sources it was built from."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(csrc, "*"))):
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def prebuilt_mismatch(pkg_dir: str = _PKG) -> str:
    """Why the prebuilt ``_C`` in ``pkg_dir`` must not be imported, or "" if it may be: a recorded
    ``_C.sources.sha256`` that differs from ``csrc/``'s digest means the kernels were edited after the build,
    and importing it would silently run the old ones. setup.py's build records none (it is rebuilt with the
    package)."""
    record = os.path.join(pkg_dir, "_C.sources.sha256")
    if not os.path.exists(record):
        return ""
    with open(record) as f:
        recorded = f.read().strip()
    if recorded == sources_digest(os.path.join(pkg_dir, "csrc")):
        return ""
    return f"prebuilt milo_tensor._C skipped: {record} records other csrc/ sources (rebuild it); "


def _summarize(err: BaseException) -> str:
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    keys = [ln for ln in lines if "error" in ln.lower()]
    picked = keys[:3] if keys else lines[-3:]
    summary = " | ".join(picked)
    return summary[:600] if summary else type(err).__name__


def _load() -> tuple[bool, str]:
    try:
        import torch
    except Exception as e:  # pragma: no cover - torch is a hard dependency
        return False, f"torch is not importable ({e})"
    if not torch.version.cuda:
        return False, "CPU-only torch build"

    # 1. ahead-of-time build
    prebuilt_error = prebuilt_mismatch()
    if not prebuilt_error:
        try:
            import milo_tensor._C  # noqa: F401

            return True, "prebuilt milo_tensor._C"
        except ImportError:
            pass
        except Exception as e:  # a stale / ABI-incompatible build: fall through to the JIT
            prebuilt_error = f"prebuilt milo_tensor._C failed to load ({_summarize(e)}); "

    if not torch.cuda.is_available():
        return False, prebuilt_error + "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if os.environ.get("MILO_NO_JIT", "") not in ("", "0"):
        return False, prebuilt_error + "MILO_NO_JIT is set and no prebuilt milo_tensor._C was found"

    # 2. just-in-time build
    try:
        from torch.utils.cpp_extension import CUDA_HOME, load
    except Exception as e:
        return False, prebuilt_error + f"torch.utils.cpp_extension is unusable ({e})"
    if CUDA_HOME is None:
        return False, prebuilt_error + "no CUDA toolkit found (nvcc); set CUDA_HOME or install the CUDA toolkit"
    sources = sorted(glob.glob(os.path.join(_CSRC, "*.cu")))
    if not sources:
        return False, prebuilt_error + f"no CUDA sources in {_CSRC}"
    verbose = os.environ.get("MILO_JIT_VERBOSE", "") not in ("", "0")
    try:
        load(
            name="milo_tensor_cuda",
            sources=sources,
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo", *arch_flags()],
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as e:
        return False, prebuilt_error + f"compiling csrc/ failed: {_summarize(e)}"
    return True, "JIT-compiled csrc/ (torch.utils.cpp_extension)"


def load_extension() -> bool:
    """Load (building on first use if needed) the CUDA kernels. True if they are registered.

    Never raises; on failure warns once with the reason and returns False.
    """
    global _STATE, _REASON
    if _STATE is not None:
        return _STATE
    with _LOCK:
        if _STATE is not None:
            return _STATE
        try:
            ok, reason = _load()
        except Exception as e:  # belt and braces: never raise
            ok, reason = False, f"unexpected error ({_summarize(e)})"
        _STATE, _REASON = ok, reason
        if not ok and reason != "CPU-only torch build":
            warnings.warn(
                f"milo_tensor: CUDA kernels unavailable, using the reference implementation: {reason}",
                RuntimeWarning,
                stacklevel=2,
            )
    return _STATE
