"""`milo demo` (the README's main command) and `milo eval`, through the console entry point."""

import re

import pytest
import torch

from milo_tensor import milo_int3, quantize_, save_quantized
from milo_tensor.cli import main
from milo_tensor.data import encode, perplexity
from models import tiny_moe


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 2 and not set(cells[0]) <= {"-"} and cells[0] != "method":
            rows[cells[0]] = cells[1:]
    return rows


def test_demo_milo_beats_rtn_and_hqq(capsys):
    """The shipped trained model at 3 bits: every MiLo rank policy scores a lower held-out
    perplexity than RTN and HQQ, and all of them are worse than the float model."""
    assert main(["demo", "--max-tokens", "4096"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    ppl = {name: float(cells[0]) for name, cells in rows.items()}
    bits = {name: float(cells[-3]) for name, cells in rows.items()}
    milo = [name for name in ppl if name.startswith("MiLo-3")]
    assert len(milo) == 4, rows
    float_ppl = ppl.pop("float (bf16 weights)")
    assert 1.5 < float_ppl < 6  # trained: far below a uniform byte model's 256
    for name in milo:
        assert ppl[name] < min(ppl["RTN-3"], ppl["HQQ-3"]), (name, ppl)
        assert 3.5 < bits[name] < 4.5, (name, bits[name])  # compensators cost a fraction of a bit
    assert all(p > float_ppl for p in ppl.values()), ppl
    assert bits["RTN-3"] == bits["HQQ-3"] == 3.5  # 3-bit codes + bf16 scale and zero per 64


def test_eval_of_a_saved_milo_checkpoint(tmp_path, gen, capsys):
    model = tiny_moe("mixtral", seed=5)
    quantize_(model, milo_int3(rank_fn=8, iters=2), progress=False)
    save_quantized(model, tmp_path / "q")
    text = "".join(chr(c) for c in torch.randint(32, 127, (700,), generator=gen).tolist())
    (tmp_path / "t.txt").write_text(text)
    assert main(["eval", str(tmp_path / "q"), "--text", str(tmp_path / "t.txt"), "--seq-len", "64"]) == 0
    printed = float(re.search(r"perplexity (\S+)", capsys.readouterr().out).group(1))
    assert printed == pytest.approx(perplexity(model, encode(text), seq_len=64), rel=1e-4)
