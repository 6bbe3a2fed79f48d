"""`milo demo` and `milo eval`: what a newcomer runs first, and perplexity of any model folder.

The demo quantizes the tiny MoE shipped in milo_tensor/assets/tiny_moe (no download needed) with
each method at 3 bits and prints one table, so the MiLo claim -- compensators win back most of the
3-bit loss for a few % more memory -- can be checked on any CPU in about a minute.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from milo_tensor.data import encode, heldout_snapshot, perplexity
from milo_tensor.evaluation import Method, evaluate, load_float_model, markdown_table, milo_method

TINY_MOE = Path(__file__).parent / "assets" / "tiny_moe"


def demo_methods() -> list[Method]:
    """3-bit group-64 methods. The compensators are stored in int3 (group 64): on the tiny model's
    256-wide weights a bf16 rank-r compensator costs 16·2r/256 bits per weight (r=32: 4 bits),
    while int3 keeps the whole model near 4 bits; benchmarks/accuracy.py compares the storages."""
    from milo_tensor.quant.rank import ConstantRank, DenseSparseRank, EnergyRank, KurtosisRank

    return [
        milo_method("RTN-3", rank_fn=ConstantRank(0), quantizer="rtn", iters=0),
        milo_method("HQQ-3", rank_fn=ConstantRank(0), iters=0),
        milo_method("MiLo-3 constant r=32", rank_fn=ConstantRank(32), compensator_bits=3),
        milo_method("MiLo-3 dense/sparse 64/16", rank_fn=DenseSparseRank(dense_rank=64, sparse_rank=16),
                    compensator_bits=3),
        milo_method("MiLo-3 kurtosis mean 32", rank_fn=KurtosisRank(mean_rank=32, dense_rank=64), compensator_bits=3),
        milo_method("MiLo-3 energy 0.3", rank_fn=EnergyRank(fraction=0.3, max_rank=64), compensator_bits=3),
    ]


def run_demo(model_dir: Path, max_tokens: int, methods: list[Method] | None = None) -> str:
    torch.manual_seed(0)
    ids = encode(heldout_snapshot())
    results = evaluate(
        load_float_model(model_dir), ids, methods or demo_methods(), max_tokens=max_tokens,
        on_result=lambda r: print(f"  {r.name}: ppl {r.perplexity:.3f}", flush=True),
    )
    return markdown_table(results)


def _demo(args: argparse.Namespace) -> int:
    print(f"MiLo demo: 3-bit quantization of {args.model} (held-out perplexity over {args.max_tokens} bytes)")
    print(run_demo(Path(args.model), args.max_tokens))
    return 0


def _tokenize(model_dir: Path, text: str) -> torch.Tensor:
    """The folder's own tokenizer if it ships one, else bytes (the shipped tiny MoE is byte-level)."""
    if any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        return torch.tensor(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"])
    return encode(text)


def _eval(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    model_dir = Path(args.model)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # MiLo checkpoints load quantized
    text = Path(args.text).read_text(encoding="utf-8")
    ppl = perplexity(model, _tokenize(model_dir, text), seq_len=args.seq_len, max_tokens=args.max_tokens)
    print(f"perplexity {ppl:.4f}")
    return 0


def add_commands(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="quantize the shipped tiny MoE with RTN, HQQ and MiLo; print a table")
    demo.add_argument("--model", default=str(TINY_MOE), help="float transformers model folder (default: the shipped tiny MoE)")
    demo.add_argument("--max-tokens", type=int, default=16384, help="held-out bytes to score")
    demo.set_defaults(func=_demo)

    ev = subparsers.add_parser("eval", help="perplexity of a model folder (float or MiLo checkpoint) on a text file")
    ev.add_argument("model", help="model folder")
    ev.add_argument("--text", required=True, help="UTF-8 text file, scored byte by byte")
    ev.add_argument("--seq-len", type=int, default=256)
    ev.add_argument("--max-tokens", type=int, default=None)
    ev.set_defaults(func=_eval)
