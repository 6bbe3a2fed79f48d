"""Build the CUDA kernels here (no GPU needed) for the device machine's torch, so a device call skips the build.

Each device call gets a fresh machine and a fresh copy of the tree, so the JIT rebuilds the extension there
(~2.5 min of the session's 30 device minutes). This script compiles the same sources with the same nvcc
flags as the loader's JIT (milo_tensor/ops/cuda.py) against the headers and libraries of the device's torch
wheel, unpacked here, and links them with csrc/module.cpp as ``milo_tensor/_C.abi3.so`` (module.cpp built
against Python's stable ABI, so this machine's Python 3.11 headers serve the device's 3.12). The loader
imports a prebuilt ``milo_tensor._C`` before it tries the JIT; ``_C.sources.sha256`` beside it names the
sources it was built from, and the loader skips (and JIT-compiles instead of) a library whose sources have changed.
Builds are incremental (ninja, under build/prebuild/<tree name>, which no device call carries).

    pip download --no-deps torch==2.11.0 -d /tmp/t211      # the device's torch (2.11.0+cu130)
    unzip -q /tmp/t211/torch-*.whl 'torch/include/*' 'torch/lib/lib*.so' -d /tmp/t211/x
    python scripts/prebuild_ext.py --torch /tmp/t211/x/torch [--tree .dev/old]

then carry ``milo_tensor/_C.abi3.so`` and ``milo_tensor/_C.sources.sha256`` (and .dev) in the device call.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_loader(tree: str):
    """The tree's own loader module (milo_tensor/ops/cuda.py: its gencode flags and sources digest), read
    from its file without importing the package (which imports torch's ops)."""
    spec = importlib.util.spec_from_file_location("_milo_loader", os.path.join(tree, "milo_tensor", "ops", "cuda.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_ninja(tree: str, torch_root: str, build: str, cuda_home: str) -> str:
    csrc = os.path.join(tree, "milo_tensor", "csrc")
    inc = [os.path.join(torch_root, "include"), os.path.join(torch_root, "include", "torch", "csrc", "api", "include"),
           os.path.join(cuda_home, "include")]
    isys = " ".join(f"-isystem {shlex.quote(p)}" for p in inc)
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what the JIT adds to every nvcc command

    nvcc_flags = " ".join([f"-DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H {isys}", *COMMON_NVCC_FLAGS,
                           *tree_loader(tree).arch_flags(), "--compiler-options '-fPIC'", "-O3 -std=c++17 -lineinfo"])
    py_inc = sysconfig.get_path("include", scheme="posix_prefix")
    cxx_flags = f"-fPIC -O3 -std=c++17 -DPy_LIMITED_API=0x030B0000 -isystem {shlex.quote(py_inc)}"
    lib = os.path.join(torch_root, "lib")
    ldflags = (f"-shared -L{shlex.quote(lib)} -lc10 -lc10_cuda -ltorch_cpu -ltorch_cuda -ltorch "
               f"-L{shlex.quote(os.path.join(cuda_home, 'lib64'))} -lcudart")
    cus = sorted(glob.glob(os.path.join(csrc, "*.cu")))
    out = os.path.join(tree, "milo_tensor", "_C.abi3.so")
    lines = [
        f"nvcc = {cuda_home}/bin/nvcc",
        f"rule cuda\n  depfile = $out.d\n  deps = gcc\n  command = $nvcc --generate-dependencies-with-compile "
        f"--dependency-output $out.d {nvcc_flags} -c $in -o $out",
        f"rule cxx\n  depfile = $out.d\n  deps = gcc\n  command = c++ -MMD -MF $out.d {cxx_flags} -c $in -o $out",
        f"rule link\n  command = c++ $in {ldflags} -o $out",
    ]
    objs = []
    for src in cus:
        obj = os.path.join(build, os.path.basename(src)[:-3] + ".cuda.o")
        lines.append(f"build {obj}: cuda {os.path.abspath(src)}")
        objs.append(obj)
    obj = os.path.join(build, "module.o")
    lines.append(f"build {obj}: cxx {os.path.abspath(os.path.join(csrc, 'module.cpp'))}")
    objs.append(obj)
    lines.append(f"build {os.path.abspath(out)}: link {' '.join(objs)}")
    with open(os.path.join(build, "build.ninja"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch", required=True, help="the device torch wheel's unpacked torch/ directory (include/, lib/)")
    ap.add_argument("--tree", default=REPO, help="the tree whose milo_tensor/ to build (default: this repository)")
    ap.add_argument("--cuda-home", default=os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    ap.add_argument("-j", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    os.environ.setdefault("MILO_CUDA_ARCHS", "90")  # the device is an H100/H200
    tree = os.path.abspath(args.tree)
    for need in ("include/torch/library.h", "lib/libtorch_cuda.so"):
        if not os.path.exists(os.path.join(args.torch, need)):
            sys.exit(f"--torch {args.torch}: no {need}; unpack the device's torch wheel (see this script's docstring)")
    name = "main" if tree == REPO else os.path.basename(tree.rstrip("/"))
    build = os.path.join(REPO, "build", "prebuild", name)
    os.makedirs(build, exist_ok=True)
    out = write_ninja(tree, os.path.abspath(args.torch), build, args.cuda_home)
    rc = subprocess.call(["ninja", "-C", build, f"-j{args.j}"])
    if rc:
        return rc
    with open(os.path.join(os.path.dirname(out), "_C.sources.sha256"), "w") as f:
        f.write(tree_loader(REPO).sources_digest(os.path.join(tree, "milo_tensor", "csrc")) + "\n")
    print(f"built {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
