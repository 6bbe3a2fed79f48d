"""Which of the kernels' tensor-core tiles run on this GPU, for the GPU tests (imported by name, as
tests/weights.py is, so `python tests/test_*.py --sanitize` finds it too)."""

import pytest
import torch


def tile8_runs() -> bool:
    """Tiles 8 and 9 (warpgroup MMAs) are built for sm_90a and run on compute capability 9.0 only."""
    return torch.cuda.get_device_capability() == (9, 0)


def skip_unless_tile_runs(cfg: str) -> None:
    if cfg in ("8", "9") and not tile8_runs():
        pytest.skip(f"tile {cfg} (wgmma) needs compute capability 9.0")
