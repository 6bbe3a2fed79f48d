"""Compare quantization methods on one float model: perplexity, weight error, bytes, time.

Shared by ``milo demo`` (a quick table on the shipped tiny MoE) and ``benchmarks/accuracy.py``
(the full table in docs/benchmarks.md), so both measure the same way:

- every method starts from the same float weights (a deep copy of the loaded model);
- weights are quantized from the model's storage dtype (bf16 for the shipped model), so scales,
  zeros and compensators are counted at the size they would be stored, then the model is cast
  to float32 for scoring, so the comparison is about the weights, not about bf16 matmuls;
- bytes are the payload of the quantized weights (codes, scales, zeros, compensator at its real
  ranks) against the same weights at 16 bits.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from milo_tensor.config import milo_int3, milo_target_weights, quantize_
from milo_tensor.data import perplexity
from milo_tensor.quant.affine import quantize_rtn
from milo_tensor.quant.hqq import quantize_hqq
from milo_tensor.tensor import MiLoInt3Tensor

__all__ = ["Method", "Result", "milo_method", "fake_quant_method", "load_float_model", "evaluate", "markdown_table"]


@dataclass
class Method:
    """A named way to quantize a model in place; returns {parameter name: payload bytes}."""

    name: str
    apply: Callable[[nn.Module], dict[str, int]]


@dataclass
class Result:
    name: str
    perplexity: float
    weight_error: dict[str, float] = field(default_factory=dict)  # mean relative error per kind
    quantized_bytes: int = 0
    float16_bytes: int = 0
    seconds: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        return 16.0 * self.quantized_bytes / self.float16_bytes if self.float16_bytes else 16.0


def milo_method(name: str, **config_kwargs) -> Method:
    """A ``quantize_(model, milo_int3(**config_kwargs))`` method (RTN/HQQ are its rank-0 cases)."""

    def apply(model: nn.Module) -> dict[str, int]:
        quantize_(model, milo_int3(**config_kwargs), progress=False)
        return {n: p.payload_nbytes() for n, p in model.named_parameters() if isinstance(p, MiLoInt3Tensor)}

    return Method(name, apply)


def fake_quant_method(name: str, bits: int, group_size: int = 64, quantizer: str = "hqq") -> Method:
    """Round the weights MiLo would quantize to ``bits``-bit affine groups, in place (dequantized
    back to float).

    For baselines that MiLoInt3Tensor does not store (e.g. HQQ at 4 bits): the same error a real
    kernel would see, bytes counted as packed codes plus 16-bit scale and zero per group.
    """
    quant = quantize_hqq if quantizer == "hqq" else quantize_rtn

    def apply(model: nn.Module) -> dict[str, int]:
        params = dict(model.named_parameters())
        nbytes = {}
        for target in milo_target_weights(model):
            p = params[target]
            q = quant(p.detach().float(), bits, group_size, qparam_dtype=p.dtype)
            with torch.no_grad():
                p.copy_(q.dequantize(p.dtype))
            nbytes[target] = p.numel() * bits // 8 + 2 * 2 * p.numel() // group_size
        return nbytes

    return Method(name, apply)


def load_float_model(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _kind(name: str) -> str:
    """Routed experts (transformers' fused ``mlp.experts.*`` stacks) vs everything else."""
    return "experts" if ".experts." in name else "dense"


def evaluate(
    float_model: nn.Module,
    ids: torch.Tensor,
    methods: list[Method],
    *,
    max_tokens: int | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Score the float model, then each method on its own copy of it."""
    reference = {n: p.detach().float() for n, p in float_model.named_parameters()}
    results = [Result("float (bf16 weights)", perplexity(copy.deepcopy(float_model).float(), ids, max_tokens=max_tokens))]
    if on_result:
        on_result(results[0])
    for method in methods:
        model = copy.deepcopy(float_model)
        start = time.perf_counter()
        nbytes = method.apply(model)
        seconds = time.perf_counter() - start
        params = dict(model.named_parameters())
        errors: dict[str, list[float]] = {}
        for name in nbytes:
            p = params[name]
            w = p.dequantize(torch.float32) if isinstance(p, MiLoInt3Tensor) else p.detach().float()
            errors.setdefault(_kind(name), []).append(float((w - reference[name]).norm() / reference[name].norm()))
        model = model.float()
        result = Result(
            method.name,
            perplexity(model, ids, max_tokens=max_tokens),
            {kind: sum(v) / len(v) for kind, v in sorted(errors.items())},
            sum(nbytes.values()),
            sum(reference[n].numel() * 2 for n in nbytes),
            seconds,
        )
        results.append(result)
        if on_result:
            on_result(result)
    return results


def markdown_table(results: list[Result]) -> str:
    """One row per method; 'recovered' is the share of HQQ-3's perplexity loss a method wins back."""
    base = results[0].perplexity
    hqq3 = next((r.perplexity for r in results if r.name.startswith("HQQ") and "3" in r.name), None)
    kinds = sorted({k for r in results for k in r.weight_error})
    header = ["method", "held-out ppl", "recovered vs HQQ-3", *[f"rel. err {k}" for k in kinds], "bits/weight", "vs 16-bit", "quantize s"]
    rows = []
    for r in results:
        recovered = "-"
        if hqq3 is not None and r.quantized_bytes and hqq3 > base:
            recovered = f"{(hqq3 - r.perplexity) / (hqq3 - base):.0%}"
        errs = [f"{r.weight_error[k]:.4f}" if k in r.weight_error else "-" for k in kinds]
        size = [f"{r.bits_per_weight:.2f}", f"{r.bits_per_weight / 16:.1%}"] if r.quantized_bytes else ["16", "100%"]
        rows.append([r.name, f"{r.perplexity:.3f}", recovered, *errs, *size, f"{r.seconds:.1f}" if r.quantized_bytes else "-"])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
