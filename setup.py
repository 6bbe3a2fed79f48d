"""Optional ahead-of-time build of the CUDA kernels as ``milo_tensor._C``.

Metadata lives in pyproject.toml; this file only adds the extension module, and only when it can
be built: torch with CUDA importable in the build environment (``torch.version.cuda``), a CUDA
toolkit found (``CUDA_HOME``), and ``MILO_NO_BUILD_EXT`` unset. Otherwise the package installs as
pure Python (the kernels are then compiled on first use, or the reference path runs).

pip builds in an isolated environment without torch by default, which gives the pure-Python
install; to build the kernels ahead of time on a CUDA machine use

    pip install --no-build-isolation -e .

``MILO_CUDA_ARCHS`` (e.g. "80;90") picks the targets, as for the just-in-time build.
"""

import glob
import importlib.util
import os

from setuptools import setup


def _cuda_extension():
    if os.environ.get("MILO_NO_BUILD_EXT", "") not in ("", "0"):
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:
        return None
    if not torch.version.cuda or CUDA_HOME is None:
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join("milo_tensor", "csrc")
    sources = sorted(glob.glob(os.path.join(here, csrc, "*.cu")))
    sources = [os.path.relpath(s, here) for s in sources] + [os.path.join(csrc, "module.cpp")]
    # the loader's flags, read from its file (importing the package would import torch's ops first)
    spec = importlib.util.spec_from_file_location("_milo_cuda_loader", os.path.join(here, "milo_tensor", "ops", "cuda.py"))
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    gencode = loader.arch_flags()
    ext = CUDAExtension(
        name="milo_tensor._C",
        sources=sources,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", *gencode],
        },
    )
    return ext, BuildExtension.with_options(use_ninja=True)


_built = _cuda_extension()
if _built is None:
    setup()
else:
    _ext, _build_ext = _built
    setup(ext_modules=[_ext], cmdclass={"build_ext": _build_ext})
