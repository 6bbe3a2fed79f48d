"""Compression benchmark: time and weight error of RTN, HQQ and MiLo, calibration-free.

    python benchmarks/compress.py --device cuda --out compress.md     # the full table (GPU)
    python benchmarks/compress.py --quick                             # small shapes, CPU-friendly

Cases (weights: Student-t, df=3, std-ish 0.02, drawn in float32, rounded to bf16, then quantized
from float32 like a bf16 checkpoint would be; scales/zeros stored in bf16):
- one Mixtral-8x7B expert stack, 8 × 14336 × 4096, MiLo rank 32 per expert, T = 20;
- one 4096 × 4096 dense (attention-sized) weight, MiLo rank 512, T = 20.
All methods: 3 bits, group 64. Each method runs once on a small input first (library / kernel
warm-up), then once timed on the full weight, with CUDA synchronised around it. "rel. error" is
‖W − Ŵ‖_F / ‖W‖_F (mean over the experts of a stack; max in parentheses).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import time
import types
from dataclasses import dataclass

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _import_quant():
    """The quant/ modules; without running milo_tensor/__init__ if its dependencies (torchao,
    transformers) are missing, e.g. on a bare GPU box: quant/ needs only torch."""
    try:
        return importlib.import_module("milo_tensor.quant.compensator"), importlib.import_module(
            "milo_tensor.quant.hqq"
        ), importlib.import_module("milo_tensor.quant.affine")
    except ImportError:
        for name in [m for m in sys.modules if m == "milo_tensor" or m.startswith("milo_tensor.")]:
            del sys.modules[name]
        pkg = types.ModuleType("milo_tensor")
        pkg.__path__ = [os.path.join(REPO, "milo_tensor")]
        sys.modules["milo_tensor"] = pkg
        return (
            importlib.import_module("milo_tensor.quant.compensator"),
            importlib.import_module("milo_tensor.quant.hqq"),
            importlib.import_module("milo_tensor.quant.affine"),
        )


compensator, hqq, affine = _import_quant()

BITS, GROUP = 3, 64


@dataclass
class Case:
    name: str
    shape: tuple[int, ...]
    rank: int
    iters: int


FULL = [Case("Mixtral expert stack", (8, 14336, 4096), 32, 20), Case("dense 4096²", (4096, 4096), 512, 20)]
QUICK = [Case("expert stack (quick)", (4, 384, 1024), 16, 10), Case("dense (quick)", (640, 640), 64, 10)]


def student_t(shape, device, seed: int, df: int = 3) -> torch.Tensor:
    """Heavy-tailed weights like an LLM's, generated on ``device``, rounded through bf16."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(shape, generator=gen, device=device)
    chi2 = torch.zeros(shape, device=device)
    for _ in range(df):
        chi2.add_(torch.randn(shape, generator=gen, device=device).square_())
    w.div_(chi2.div_(df).sqrt_()).mul_(0.02)
    del chi2
    return w.to(torch.bfloat16).to(torch.float32)


def rel_errors(w: torch.Tensor, approx: torch.Tensor) -> list[float]:
    w3, a3 = w.reshape(-1, *w.shape[-2:]), approx.reshape(-1, *w.shape[-2:])
    num = torch.linalg.vector_norm(w3 - a3, dim=(-2, -1))
    return (num / torch.linalg.vector_norm(w3, dim=(-2, -1))).tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def methods(case: Case):
    """(name, rank, iters, fn(w) -> reconstruction) for one case."""
    q = dict(qparam_dtype=torch.bfloat16)

    def rtn(w):
        return affine.quantize_rtn(w, BITS, GROUP, **q).dequantize()

    def hqq_(w):
        return hqq.quantize_hqq(w, BITS, GROUP, **q).dequantize()

    def milo(w, iters=case.iters, rank=case.rank):
        res = compensator.milo_compress(w, rank, bits=BITS, group_size=GROUP, iters=iters, **q)
        return res.quantized.dequantize() + res.u @ res.v

    return [("RTN", 0, 0, rtn), ("HQQ", 0, 0, hqq_), ("MiLo (HQQ)", case.rank, case.iters, milo)]


def run_case(case: Case, device: torch.device, seed: int) -> list[list[str]]:
    w = student_t(case.shape, device, seed)
    n, k = case.shape[-2:]
    svd = compensator.choose_svd(n, k, case.rank)
    small = w.reshape(-1, n, k)[:2, : min(n, 256), : min(k, 512)].contiguous()
    rows = []
    for name, rank, iters, fn in methods(case):
        # warm-up: library handles, kernels, allocator (small input, rank capped to fit it)
        if rank:
            compensator.milo_compress(
                small, min(rank, 64), group_size=GROUP, iters=2, qparam_dtype=torch.bfloat16, svd=svd
            )
        else:
            fn(small)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        approx = fn(w)
        sync(device)
        seconds = time.perf_counter() - start
        errs = rel_errors(w, approx)
        del approx
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"
        err = f"{sum(errs) / len(errs):.4f}" + (f" ({max(errs):.4f})" if len(errs) > 1 else "")
        rows.append([
            name,
            " × ".join(map(str, case.shape)),
            str(rank),
            str(iters) if rank else "-",
            svd if rank else "-",
            f"{seconds:.2f}",
            err,
            peak,
        ])
        print(" | ".join(rows[-1]), flush=True)
    del w
    return rows


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU, < 30 s)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: shared machines)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    cases = QUICK if args.quick else FULL
    header = ["method", "shape", "rank", "T", "svd", "seconds", "rel. error", "peak GiB"]
    print(" | ".join(header), flush=True)
    rows = []
    for i, case in enumerate(cases):
        rows += run_case(case, device, args.seed + i)
    stamp = datetime.date.today().isoformat()
    meta = (
        f"Compression benchmark ({'quick' if args.quick else 'full'}), {dev_name} ({device.type}), "
        f"torch {torch.__version__}, {stamp}. 3 bits, group 64, bf16 scales/zeros, Student-t(3) weights; "
        f"rel. error = ‖W − Ŵ‖_F / ‖W‖_F, mean (max) over experts."
    )
    md = meta + "\n\n" + table(rows, header) + "\n"
    print()
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    return md


if __name__ == "__main__":
    main()
