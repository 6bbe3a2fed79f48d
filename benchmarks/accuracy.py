"""Accuracy benchmark: held-out perplexity and weight error of 3-bit methods on a trained MoE.

The float model (default: the tiny Mixtral shipped in milo_tensor/assets/tiny_moe) against RTN-3,
HQQ-3, MiLo-3 under each rank policy and compensator storage, and RTN-4/HQQ-4 at similar memory,
all on the same held-out bytes of milo_tensor.data's corpus. CPU is enough (a few minutes).

    python benchmarks/accuracy.py                 # print the table
    python benchmarks/accuracy.py --write-docs    # also replace the Accuracy section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from milo_tensor.cli_demo import TINY_MOE
from milo_tensor.data import encode, heldout_snapshot
from milo_tensor.evaluation import Method, evaluate, fake_quant_method, load_float_model, markdown_table, milo_method
from milo_tensor.quant.rank import ConstantRank, DenseSparseRank, EnergyRank, KurtosisRank

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SECTION = "## Accuracy"


def methods() -> list[Method]:
    """Ranks for 256-wide weights: r=32 on the tiny model costs what r=512 costs on a 4096-wide one."""
    return [
        milo_method("RTN-3", rank_fn=ConstantRank(0), quantizer="rtn", iters=0),
        milo_method("HQQ-3", rank_fn=ConstantRank(0), iters=0),
        fake_quant_method("RTN-4 (fake quant)", bits=4, quantizer="rtn"),
        fake_quant_method("HQQ-4 (fake quant)", bits=4),
        milo_method("MiLo-3 constant r=8", rank_fn=ConstantRank(8)),
        milo_method("MiLo-3 constant r=32", rank_fn=ConstantRank(32)),
        milo_method("MiLo-3 constant r=32, int8 comp.", rank_fn=ConstantRank(32), compensator_bits=8),
        milo_method("MiLo-3 constant r=32, int3 comp.", rank_fn=ConstantRank(32), compensator_bits=3),
        milo_method("MiLo-3 constant r=32, int3 comp., T=1", rank_fn=ConstantRank(32), compensator_bits=3, iters=1),
        milo_method("MiLo-3 constant r=64, int3 comp.", rank_fn=ConstantRank(64), compensator_bits=3),
        milo_method("MiLo-3 dense/sparse 64/16", rank_fn=DenseSparseRank(dense_rank=64, sparse_rank=16)),
        milo_method("MiLo-3 dense/sparse 64/16, int3 comp.", rank_fn=DenseSparseRank(dense_rank=64, sparse_rank=16),
                    compensator_bits=3),
        milo_method("MiLo-3 kurtosis mean 32, int3 comp.", rank_fn=KurtosisRank(mean_rank=32, dense_rank=64),
                    compensator_bits=3),
        milo_method("MiLo-3 energy 0.3 (max 64), int3 comp.", rank_fn=EnergyRank(fraction=0.3, max_rank=64),
                    compensator_bits=3),
    ]


def describe(model_dir: Path, max_tokens: int, threads: int) -> str:
    card_path = model_dir / "training.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    model = f"{model_dir.name} ({card.get('architecture', 'transformers model')}, {card.get('parameters', '?')} parameters)"
    return (
        f"Model: {model}, bf16 weights. Held-out text: the first {max_tokens} bytes of "
        f"the held-out text shipped with the model (`milo_tensor.data.heldout_snapshot()`), windows of 256. All methods: group 64, bf16 "
        f"scales/zeros (and compensators unless int8/int3), T=20 MiLo iterations unless noted, "
        f"HQQ quantizer; `lm_head` and routers stay bf16. Bits/weight counts codes, scales, zeros and "
        f"compensators of the quantized weights; 'recovered' is the share of HQQ-3's perplexity loss "
        f"won back; rel. err is the mean ‖W − Ŵ‖_F / ‖W‖_F per kind. 4-bit rows are fake-quantized "
        f"(the error a 4-bit kernel would see; MiLoInt3Tensor stores 3 bits only).\n\n"
        f"Device: CPU ({platform.processor() or platform.machine()}, {threads} threads); torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}; "
        f"date {datetime.date.today().isoformat()}.\n\n"
        f"Command: `python benchmarks/accuracy.py --max-tokens {max_tokens} --write-docs`"
    )


def write_section(path: Path, body: str) -> None:
    """Replace the Accuracy section (to the next '## ' heading or the end) atomically."""
    text = path.read_text()
    start = text.index(SECTION) if SECTION in text else len(text)
    nxt = text.find("\n## ", start + len(SECTION))
    rest = text[nxt + 1 :] if nxt != -1 else ""
    new = text[:start].rstrip("\n") + f"\n\n{SECTION}\n\n{body}\n" + (f"\n{rest}" if rest else "")
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(new)
    os.replace(tmp.name, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(TINY_MOE), help="float transformers model folder")
    parser.add_argument("--max-tokens", type=int, default=65536, help="held-out bytes to score")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--write-docs", action="store_true", help=f"replace the Accuracy section of {DOCS.name}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = Path(args.model)
    results = evaluate(
        load_float_model(model_dir), encode(heldout_snapshot()), methods(), max_tokens=args.max_tokens,
        on_result=lambda r: print(f"  {r.name}: ppl {r.perplexity:.4f} ({r.seconds:.1f} s)", file=sys.stderr, flush=True),
    )
    body = describe(model_dir, args.max_tokens, args.threads) + "\n\n" + markdown_table(results)
    print(body)
    if args.write_docs:
        write_section(DOCS, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
