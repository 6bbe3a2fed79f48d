import os
import zlib

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id: different inputs in every test, the same ones on
    every run and machine (crc32, not hash(), which Python salts per process)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def one_thread():
    """Small shapes: one thread is fastest, and on a shared machine 2 OpenMP threads spin-wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
