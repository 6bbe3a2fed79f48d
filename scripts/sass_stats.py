"""Static instruction counts of the milo kernels, without a GPU: compile one csrc/ file to an sm_90
cubin (nvcc), disassemble it (cuobjdump) and print, per kernel whose name matches, its registers and
spills and the instruction mix of its main loop (the smallest loop holding the most mma instructions). A change meant to cut
instructions per code can be checked here before it spends device time; docs/kernel.md quotes
such counts.

    python scripts/sass_stats.py milo_tensor/csrc/int3_gemv.cu --kernel 'half.*Li64ELi1E'

Needs nvcc (CUDA 12.4+), cuobjdump and nvdisasm on PATH; the pip wheels nvidia-cuda-cuobjdump and
nvidia-cuda-nvdisasm provide the latter two (nvidia/cu13/bin in site-packages, found automatically).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        hits = glob.glob(os.path.join(site, "nvidia", "cu*", "bin", name))
        if hits:
            return hits[0]
    sys.exit(f"{name} not found: put the CUDA toolkit's bin on PATH or `pip install nvidia-cuda-{name}`")


def compile_cubin(src: str, arch: str, out: str) -> str:
    """nvcc's ptxas report (registers, spills) for every kernel of src."""
    from torch.utils.cpp_extension import include_paths

    stub = os.path.join(os.path.dirname(out), "stub")
    os.makedirs(os.path.join(stub, "c10", "cuda", "impl"), exist_ok=True)
    open(os.path.join(stub, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "a").close()  # CPU torch lacks it
    cmd = ["nvcc", "-std=c++17", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", "-Xptxas", "-v",
           "--expt-relaxed-constexpr", "-DNDEBUG", f"-I{stub}", f"-I{sysconfig.get_paths()['include']}", "-o", out, src]
    cmd[1:1] = [f"-I{p}" for p in include_paths()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"nvcc failed:\n{proc.stderr[-4000:]}")
    return proc.stderr


def ptxas_info(report: str) -> dict[str, str]:
    info, name = {}, None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
        elif name and ("spill" in line or "Used" in line):
            info[name] = (info.get(name, "") + " " + line.split(":", 1)[-1].strip()).strip()
    return info


def kernels(sass: str) -> dict[str, list[tuple[int, str]]]:
    """name -> [(address, instruction)]"""
    out = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = chunk.split("\n", 1)
        out[name.strip()] = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s*([^;]*);", body)]
    return out


def loops(ins: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first, last) index of each backward branch's range."""
    index = {a: i for i, (a, _) in enumerate(ins)}
    found = []
    for i, (a, t) in enumerate(ins):
        m = re.search(r"BRA (?:\S+, )?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in index:
            found.append((index[int(m.group(1), 16)], i))
    return found


def main_loop(ins: list[tuple[int, str]], mma: str = "MMA") -> tuple[int, int] | None:
    """The smallest loop holding the most mma instructions (opcodes matching `mma`; the main loop also where the
    compiler left a small loop inside it); without mmas, the largest innermost loop. Tile 8 wants mma="HGMMA":
    its epilogue's loop holds more (smaller) HMMAs than its main loop's 8 warpgroup MMAs a stage."""
    found = loops(ins)
    if not found:
        return None
    mmas = {se: sum(bool(re.search(mma, t)) for _, t in ins[se[0]:se[1] + 1]) for se in found}
    if max(mmas.values()) > 0:
        return min(found, key=lambda se: (-mmas[se], se[1] - se[0]))
    inner = [(s, e) for s, e in found if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in found)]
    return max(inner, key=lambda se: se[1] - se[0])


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="a .cu file of milo_tensor/csrc")
    ap.add_argument("--kernel", default="", help="regex on the mangled kernel name (default: all)")
    ap.add_argument("--arch", default="90")
    ap.add_argument("--top", type=int, default=16, help="opcodes listed per loop")
    ap.add_argument("--mma", default="MMA", help="regex of the opcodes that mark the main loop (tile 8: HGMMA)")
    ap.add_argument("--dump", action="store_true", help="print the main loop's instructions too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        info = ptxas_info(compile_cubin(os.path.abspath(args.source), args.arch, cubin))
        env = dict(os.environ, NVDISASM_PATH=os.path.dirname(find_tool("nvdisasm")))
        dump = subprocess.run([find_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, env=env)
        if dump.returncode:
            sys.exit(f"cuobjdump failed: {dump.stderr[-2000:]}")
        sass = dump.stdout
    for name, ins in kernels(sass).items():
        if args.kernel and not re.search(args.kernel, name):
            continue
        print(f"{name}\n  {info.get(name, '')}; {len(ins)} instructions")
        for s, e in filter(None, [main_loop(ins, args.mma)]):
            mix = collections.Counter(opcode(t) for _, t in ins[s:e + 1])
            print(f"  main loop {ins[s][0]:#x}-{ins[e][0]:#x}: {e - s + 1} instructions; "
                  + ", ".join(f"{k} {v}" for k, v in mix.most_common(args.top)))
            if args.dump:
                print("\n".join(f"    {t}" for _, t in ins[s:e + 1]))


if __name__ == "__main__":
    main()
