"""Tile 7's index math (csrc/int3_gemm_wa.cu) on the CPU: scripts/emulate_tile7.py replays the kernel's
cp.async units and swizzles, each lane's code chunk and scale group, the permuted k order of its A and B
registers, the low-rank epilogue's fragments and the staging of y in numpy, and compares the result with
x @ deq(Q)^T + t @ ut in float64; tile 8's x layout and wgmma descriptors likewise. CI has no GPU; the kernel itself runs in tests/test_cuda_kernel.py."""

import importlib.util
import os

import numpy as np
import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "emulate_tile7", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "emulate_tile7.py"))
emulate_tile7 = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(emulate_tile7)


@pytest.mark.parametrize("M,N,K,G,R", [
    (20, 136, 128, 64, 0),    # 32 rows of x a block, a partial row block and column tile
    (9, 128, 256, 32, 0),     # 16 rows, two stages, a scale group per chunk
    (70, 136, 128, 128, 0),   # 64 rows, two row blocks
    (12, 136, 128, 64, 100),  # the low-rank epilogue: two rank chunks, the second partial
])
def test_tile7_index_math_matches_float64(gen, M, N, K, G, R):
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    # the kernel's own rounding (fp16 weights and products) gives ~3e-4; a wrong lane mapping or k order ~1
    assert emulate_tile7.run(M, N, K, G, dt=np.float16, seed=seed, R=R) < 1e-3


@pytest.mark.parametrize("M,N,K,G,R", [
    (40, 136, 256, 64, 0),    # 64 rows of x a block (partial), two stages, a partial column tile
    (70, 128, 128, 32, 20),   # 128 rows, a scale group per chunk, the low-rank epilogue
    (9, 136, 128, 64, 20),    # 16 rows (m64n16k16)
    (24, 128, 256, 128, 0),   # 32 rows (m64n32k16), two stages
])
def test_tile8_index_math_matches_float64(gen, M, N, K, G, R):
    """Tile 8: x stored in the wgmma's core-matrix layout and read back through the kernel's descriptors
    (start, leading and stride byte offsets) must give each A slot its k; swapping two words of a stored
    core-matrix row gives ~1.1."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    assert emulate_tile7.run(M, N, K, G, dt=np.float16, seed=seed, R=R, wg=True) < 1e-3
