"""The ``milo`` command.

    milo quantize SRC OUT [options]     quantize a transformers model folder, layer by layer (resumable)
    milo demo / milo eval               registered by milo_tensor.cli_demo when it is installed

Each subcommand registers itself with a ``func`` (``args -> exit code``) that :func:`main` calls.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["build_parser", "main"]

RANK_POLICIES = ("dense_sparse", "constant", "kurtosis", "energy")
# --compensator-dtype -> (MiLoInt3Config.compensator_bits, the float dtype it requires or None)
COMPENSATOR_DTYPES = {
    "model": (None, None),
    "fp16": (None, "float16"),
    "bf16": (None, "bfloat16"),
    "fp32": (None, "float32"),
    "int8": (8, None),
    "int3": (3, None),
}


def _rank_policy(args: argparse.Namespace):
    from milo_tensor.quant.rank import ConstantRank, DenseSparseRank, EnergyRank, KurtosisRank

    if args.rank_policy == "dense_sparse":
        return DenseSparseRank(dense_rank=args.dense_rank, sparse_rank=args.sparse_rank)
    if args.rank_policy == "constant":
        return ConstantRank(args.rank if args.rank is not None else args.sparse_rank)
    if args.rank_policy == "kurtosis":
        return KurtosisRank(mean_rank=args.sparse_rank, dense_rank=args.dense_rank)
    return EnergyRank(fraction=args.energy_fraction, max_rank=args.dense_rank, group_size=args.group_size)


def _quantize(args: argparse.Namespace) -> int:
    from milo_tensor.config import milo_int3
    from milo_tensor.streaming import quantize_checkpoint

    bits, float_dtype = COMPENSATOR_DTYPES[args.compensator_dtype]
    try:
        config = milo_int3(
            _rank_policy(args),
            group_size=args.group_size,
            iters=args.iters,
            quantizer=args.quantizer,
            compensator_bits=bits,
            compensator_group_size=args.compensator_group_size,
        )
        summary = quantize_checkpoint(
            args.src, args.out, config, device=args.device, dtype=args.dtype, progress=not args.no_progress,
            compensator_dtype=float_dtype,
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted: completed layers are kept in {args.out}; run the same command again to resume",
              file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        print(f"milo quantize: error: {err}", file=sys.stderr)
        return 2
    print(summary.table())
    return 0


def _add_quantize(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="quantize a transformers model folder to a MiLo checkpoint, layer by layer",
        description=(
            "Quantize the float transformers model in SRC (config.json + safetensors) to a MiLo checkpoint in OUT, "
            "one decoder layer at a time: only that layer's tensors are read and held, so memory stays near one "
            "layer. Completed layers are written as shards as they finish; after an interruption, run the same "
            "command again to continue (the result is byte-identical to an uninterrupted run). OUT loads with "
            "milo_tensor.load_quantized(OUT) or AutoModelForCausalLM.from_pretrained(OUT) after `import milo_tensor`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("src", help="float model folder (config.json + model.safetensors or a sharded index)")
    p.add_argument("out", help="output folder for the MiLo checkpoint (created; resumed if it holds a partial run)")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128), help="3-bit quantization group along the input dim")
    p.add_argument("--iters", type=int, default=20, help="MiLo iterations (quantize <-> refit the compensator)")
    p.add_argument("--quantizer", default="hqq", choices=("hqq", "rtn"), help="3-bit quantizer: HQQ solver or round-to-nearest")
    p.add_argument("--rank-policy", default="dense_sparse", choices=RANK_POLICIES,
                   help="compensator ranks: dense_sparse (dense/sparse ranks), constant (--rank), kurtosis "
                        "(experts share --sparse-rank on average by kurtosis; dense weights --dense-rank), "
                        "energy (--energy-fraction, at most --dense-rank)")
    p.add_argument("--dense-rank", type=int, default=64, help="rank of attention / shared-expert / dense-MLP weights")
    p.add_argument("--sparse-rank", type=int, default=16, help="rank of routed-expert weights")
    p.add_argument("--rank", type=int, default=None, help="rank of every weight with --rank-policy constant (None: use --sparse-rank)")
    p.add_argument("--energy-fraction", type=float, default=0.5, help="spectral energy kept with --rank-policy energy")
    p.add_argument("--compensator-dtype", default="model", choices=tuple(COMPENSATOR_DTYPES),
                   help="storage of the compensator U, V: 'model' (the weights' float dtype), int8 or int3 "
                        "(quantized in groups of --compensator-group-size), or fp16/bf16/fp32 (a float dtype, "
                        "which must be the model's: the format keeps a float compensator in the weights' dtype)")
    p.add_argument("--compensator-group-size", type=int, default=64, help="group size of an int8 / int3 compensator")
    p.add_argument("--device", default="cpu", help="device that runs the quantization (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="float dtype the model is built in (auto: config.json's, as from_pretrained)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_quantize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="milo",
        description="MiLo: 3-bit MoE weights with low-rank compensators (arXiv 2504.02658).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_quantize(subparsers)
    try:
        from milo_tensor import cli_demo
    except ImportError:
        cli_demo = None
    if cli_demo is not None:
        cli_demo.add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
