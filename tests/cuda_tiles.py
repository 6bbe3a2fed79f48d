"""Which of the kernels' tensor-core tiles run on this GPU, for the GPU tests (imported by name, as
tests/weights.py is, so `python tests/test_*.py --sanitize` finds it too)."""

import pytest
import torch


def tile8_runs() -> bool:
    """Tile 8 (warpgroup MMAs) is built for sm_90a and runs on compute capability 9.0 only."""
    return torch.cuda.get_device_capability() == (9, 0)


def skip_unless_tile_runs(cfg: str) -> None:
    if cfg == "8" and not tile8_runs():
        pytest.skip("tile 8 (wgmma) needs compute capability 9.0")
