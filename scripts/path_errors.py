"""Relative error of milo::int3_linear per path against the float32 reference, beside the error of that
reference rounded to the output dtype (the floor any kernel has), on the inputs of
tests/test_cuda_kernel.py::test_gemv_offset_activations_and_odd_shapes (x offset by 4 from zero, odd N,
partial 512-k slices). Shows which path, not which test, loses accuracy; docs/benchmarks.md quotes it.

    python scripts/path_errors.py            # on a CUDA machine, from the repository root
"""

from __future__ import annotations

import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import test_cuda_kernel as T  # noqa: E402  (the offset test's inputs, the reference, the poisoned call)

PATHS = {"decode kernel": "8", "no decode kernel": "0"}  # MILO_INT3_GEMV_MAX_M


def main() -> None:
    assert T.load_extension(), "the CUDA extension did not load"
    for path, gemv_max_m in PATHS.items():
        os.environ["MILO_INT3_GEMV_MAX_M"] = gemv_max_m
        for dtype in (torch.bfloat16, torch.float16):
            for g in (32, 64):
                for M in (4, 8):
                    cells = []
                    for args in T.offset_cases(dtype, g, M):
                        ref = T.reference(*args)
                        err = ((T.call_poisoned(args).float() - ref).norm() / ref.norm()).item()
                        floor = ((ref.to(dtype).float() - ref).norm() / ref.norm()).item()
                        N, K = args[1].shape[0], args[0].shape[-1]
                        cells.append(f"{N}x{K} {err:.2e} / {floor:.2e}")
                    print(f"{path} {str(dtype)[6:]} g{g} M={M}: " + " | ".join(cells), flush=True)
    os.environ.pop("MILO_INT3_GEMV_MAX_M", None)


if __name__ == "__main__":
    main()
