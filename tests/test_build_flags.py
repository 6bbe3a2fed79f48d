"""The nvcc targets the loader and setup.py build for (milo_tensor.ops.cuda.arch_flags): capability 9.0 must be
built as sm_90a, which tile 8's wgmma needs, with portable PTX kept for newer GPUs. CPU only."""

import pytest

from milo_tensor.ops.cuda import arch_flags


@pytest.mark.parametrize("spec,expected", [
    ("90", ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_90,code=compute_90"]),
    ("80;90", ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
               "-gencode=arch=compute_90,code=compute_90"]),
    ("8.0, 9.0a", ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
                   "-gencode=arch=compute_90,code=compute_90"]),
    ("90;100", ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_100,code=sm_100",
                "-gencode=arch=compute_100,code=compute_100"]),
    ("", []),
])
def test_arch_flags(spec, expected):
    assert arch_flags(spec) == expected


def test_arch_flags_default_from_environment(monkeypatch):
    monkeypatch.setenv("MILO_CUDA_ARCHS", "86")
    assert arch_flags() == ["-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_86,code=compute_86"]
    monkeypatch.delenv("MILO_CUDA_ARCHS")
    assert "-gencode=arch=compute_90a,code=sm_90a" in arch_flags()
