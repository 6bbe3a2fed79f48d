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


def heavy_tailed(shape, gen, dtype=torch.float32, df=3.0):
    """Student-t weights (heavy tails like real LLM weights), never zeros."""
    normal = torch.randn(shape, generator=gen, dtype=torch.float64)
    chi2 = torch.distributions.Chi2(torch.tensor(df, dtype=torch.float64)).sample(shape)
    return (normal / torch.sqrt(chi2 / df) * 0.02).to(dtype)
