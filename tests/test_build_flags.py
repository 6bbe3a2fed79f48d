"""The nvcc targets the loader and setup.py build for (milo_tensor.ops.cuda.arch_flags): capability 9.0 must be
built as sm_90a, which tile 8's wgmma needs, with portable PTX kept for newer GPUs; and the loader's refusal of a
library prebuilt from other sources than the package's (prebuilt_mismatch). CPU only."""

import pytest

from milo_tensor.ops.cuda import arch_flags, prebuilt_mismatch, sources_digest


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


def _package(tmp_path, files):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for name, text in files.items():
        (csrc / name).write_text(text)
    return tmp_path


def test_sources_digest_follows_names_and_contents(tmp_path):
    pkg = _package(tmp_path, {"a.cu": "__global__ void k() {}\n", "b.cuh": "#pragma once\n"})
    d0 = sources_digest(str(pkg / "csrc"))
    assert d0 == sources_digest(str(pkg / "csrc")) and len(d0) == 64
    (pkg / "csrc" / "a.cu").write_text("__global__ void k() { }\n")
    d1 = sources_digest(str(pkg / "csrc"))
    assert d1 != d0
    (pkg / "csrc" / "b.cuh").rename(pkg / "csrc" / "c.cuh")
    assert sources_digest(str(pkg / "csrc")) not in (d0, d1)


def test_prebuilt_library_only_for_its_own_sources(tmp_path):
    pkg = _package(tmp_path, {"a.cu": "int x;\n"})
    assert prebuilt_mismatch(str(pkg)) == ""  # no record (setup.py's build): trusted
    (pkg / "_C.sources.sha256").write_text(sources_digest(str(pkg / "csrc")) + "\n")
    assert prebuilt_mismatch(str(pkg)) == ""
    (pkg / "csrc" / "a.cu").write_text("int y;\n")  # the kernels edited after the build
    why = prebuilt_mismatch(str(pkg))
    assert "records other csrc/ sources" in why and "rebuild" in why
