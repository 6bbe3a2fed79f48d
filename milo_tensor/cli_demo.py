"""`milo demo` and `milo eval`: what a newcomer runs first, and perplexity of any model folder.

The demo quantizes the tiny MoE shipped in milo_tensor/assets/tiny_moe (no download needed) with
each method at 3 bits and prints one table, so the MiLo claim -- compensators win back most of the
3-bit loss for a few % more memory -- can be checked on any CPU in about a minute.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from milo_tensor.config import milo_int3, quantize_
from milo_tensor.data import corpus_text, encode, perplexity
from milo_tensor.tensor import MiLoInt3Tensor

TINY_MOE = Path(__file__).parent / "assets" / "tiny_moe"


@dataclass
class Method:
    name: str
    config_kwargs: dict


def demo_methods() -> list[Method]:
    from milo_tensor.quant.rank import ConstantRank, DenseSparseRank, EnergyRank, KurtosisRank

    return [
        Method("RTN", dict(rank_fn=ConstantRank(0), quantizer="rtn", iters=0)),
        Method("HQQ", dict(rank_fn=ConstantRank(0), quantizer="hqq", iters=0)),
        Method("MiLo constant r=16", dict(rank_fn=ConstantRank(16))),
        Method("MiLo dense/sparse 64/16", dict(rank_fn=DenseSparseRank(dense_rank=64, sparse_rank=16))),
        Method("MiLo kurtosis mean 16", dict(rank_fn=KurtosisRank(mean_rank=16, dense_rank=64))),
        Method("MiLo energy 0.3", dict(rank_fn=EnergyRank(fraction=0.3, max_rank=64))),
        Method("MiLo dense/sparse int3 comp.", dict(rank_fn=DenseSparseRank(dense_rank=64, sparse_rank=16), compensator_bits=3)),
    ]


def load_float_model(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def weight_stats(float_model: nn.Module, model: nn.Module) -> tuple[float, int, int]:
    """(mean relative weight error, bytes of the quantized weights, bytes they replaced)."""
    floats = dict(float_model.named_parameters())
    errors, qbytes, fbytes = [], 0, 0
    for name, p in model.named_parameters():
        if isinstance(p, MiLoInt3Tensor):
            ref = floats[name].detach().float()
            errors.append(float((p.dequantize(torch.float32) - ref).norm() / ref.norm()))
            qbytes += p.payload_nbytes()
            fbytes += ref.numel() * 2  # against bf16/fp16 storage
    return sum(errors) / max(len(errors), 1), qbytes, fbytes


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def run_demo(model_dir: Path, max_tokens: int, methods: list[Method] | None = None) -> str:
    torch.manual_seed(0)
    float_model = load_float_model(model_dir)
    ids = encode(corpus_text("heldout"))
    base_ppl = perplexity(float_model, ids, max_tokens=max_tokens)
    header = ["method", "held-out ppl", "mean weight rel. err", "weight bytes (vs 16-bit)", "quantize s"]
    rows = [["float32 (reference)", f"{base_ppl:.3f}", "0", "100%", "-"]]
    for method in methods or demo_methods():
        model = copy.deepcopy(float_model)
        start = time.perf_counter()
        quantize_(model, milo_int3(**method.config_kwargs), progress=False)
        seconds = time.perf_counter() - start
        err, qbytes, fbytes = weight_stats(float_model, model)
        ppl = perplexity(model, ids, max_tokens=max_tokens)
        rows.append([method.name, f"{ppl:.3f}", f"{err:.4f}", f"{qbytes / fbytes:.1%}", f"{seconds:.1f}"])
        print(f"  {method.name}: ppl {ppl:.3f}", flush=True)
    return _table(rows, header)


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
    demo.add_argument("--max-tokens", type=int, default=32768, help="held-out bytes to score")
    demo.set_defaults(func=_demo)

    ev = subparsers.add_parser("eval", help="perplexity of a model folder (float or MiLo checkpoint) on a text file")
    ev.add_argument("model", help="model folder")
    ev.add_argument("--text", required=True, help="UTF-8 text file, scored byte by byte")
    ev.add_argument("--seq-len", type=int, default=256)
    ev.add_argument("--max-tokens", type=int, default=None)
    ev.set_defaults(func=_eval)
