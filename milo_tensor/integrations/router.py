"""A MoE router's whole forward as one op (``milo::router_topk``).

transformers' top-k routers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) compute ``F.linear`` for the logits,
then a float32 softmax, ``torch.topk`` and, where the model asks, the chosen probabilities divided by
their sum. Compiled, that is cuBLAS's split-K GEMM (two kernels), a softmax kernel, torch.topk's select
and sort kernels and the renormalization: about 17 µs of a 174 µs Mixtral-shaped decode layer on an H100
(docs/benchmarks.md, 2026-12-07 11:55 UTC), for a [1, E] output. On CUDA the op is one launch for a
router of up to 128 KB at up to 16 tokens, else two (csrc/router.cu).
Only the router's forward changes; its parameters and state dict stay as they are.

A router is swapped only if, on a random batch, the fused forward returns what its own forward does
(the same logits and weights up to float rounding, the same chosen probabilities up to rounding, so
near-ties may pick the other expert): a router of another form (sigmoid scores, grouped or biased
selection as in DeepSeek-V3) is left alone.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from milo_tensor.integrations.forward_swap import swap_forward

__all__ = ["fuse_router_topk"]

logger = logging.getLogger(__name__)


def _topk_forward(router: nn.Module, hidden_states: torch.Tensor, renormalize: bool, cast: bool):
    """What transformers' top-k router returns, (logits, weights, indices), through milo::router_topk."""
    hidden_states = hidden_states.reshape(-1, router.hidden_dim)
    logits, weights, indices = torch.ops.milo.router_topk(hidden_states, router.weight, router.top_k, renormalize)
    return logits, (weights.to(logits.dtype) if cast else weights), indices


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor):
    if torch.is_grad_enabled() and self.weight.requires_grad:  # the op has no backward: training takes the model's
        return self._milo_unfused_cls.forward(self, hidden_states)
    return _topk_forward(self, hidden_states, *self._milo_router)


def _candidate(router: nn.Module) -> tuple[bool, bool] | None:
    """(renormalize, cast the weights to the logits' dtype) as transformers' top-k routers do it, or None for a
    module that is not one: Mixtral's always renormalizes and keeps float32; the others follow
    ``norm_topk_prob`` and cast."""
    weight = getattr(router, "weight", None)
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and isinstance(getattr(router, "top_k", None), int)
            and getattr(router, "hidden_dim", None) == weight.shape[1] and not hasattr(router, "bias")):
        return None
    if hasattr(router, "norm_topk_prob"):
        return bool(router.norm_topk_prob), True
    return True, False


@torch.no_grad()
def _same_as_own_forward(router: nn.Module, candidate: tuple[bool, bool], tokens: int = 16) -> bool:
    """The fused forward (``candidate``: renormalize, cast) against the router's own on a random batch: logits
    and weights within float rounding, and the same chosen probabilities within rounding (the fused GEMM sums
    in another order, so of two near-equal logits it may choose the other)."""
    weight = router.weight
    gen = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(tokens, weight.shape[1], generator=gen, device=weight.device).to(weight.dtype)
    try:
        own = router(x)
        fused = _topk_forward(router, x, *candidate)
    except Exception as err:  # a router whose forward does something else with its inputs
        logger.debug("router_topk: %s not fused (%s)", type(router).__name__, err)
        return False
    if not (isinstance(own, tuple) and len(own) == 3):
        return False
    (logits, w, idx), (f_logits, f_w, f_idx) = own, fused
    if not (logits.dtype == f_logits.dtype and w.dtype == f_w.dtype and idx.dtype == f_idx.dtype
            and logits.shape == f_logits.shape and w.shape == f_w.shape and idx.shape == f_idx.shape):
        return False
    rtol = 1e-5 if logits.dtype in (torch.float32, torch.float64) else 2e-2  # 16-bit logits: rounding
    probs = torch.softmax(logits.float(), dim=-1)
    return bool(torch.allclose(logits.float(), f_logits.float(), rtol=rtol, atol=1e-3)
                and torch.allclose(w.float(), f_w.float(), rtol=rtol, atol=1e-5)
                and torch.allclose(probs.gather(-1, idx), probs.gather(-1, f_idx), rtol=rtol, atol=1e-5))


def fuse_router_topk(model: nn.Module) -> int:
    """Run every transformers top-k router of ``model`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) through
    ``milo::router_topk``; returns how many were swapped. Routers of another form are left as they are.
    Call it after the model is on its device (the check runs the router there); safe to call twice. With
    gradients needed (grad mode on and the router's weight trainable) a router takes its own forward: the op
    has no backward."""
    swapped = 0
    for name, module in model.named_modules():
        if hasattr(module, "_milo_router"):
            swapped += 1
            continue
        candidate = _candidate(module)
        if candidate is None:
            continue
        if not _same_as_own_forward(module, candidate):
            logger.info("router_topk: %s (%s) keeps its own forward: the fused one differs", name, type(module).__name__)
            continue
        module._milo_router = candidate
        swap_forward(module, _fused_forward, "MiLoTopK")
        swapped += 1
    return swapped
