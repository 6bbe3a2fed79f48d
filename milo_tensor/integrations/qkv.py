"""An attention's q, k and v projections as one int3 matmul (``fuse_qkv``).

At decode the three projections read one input and are each a t kernel and a decode kernel: six short
launches per layer, k's and v's launch-bound (1024x4096 at M=1 on an H100: 6.0 µs for 0.8 µs of bytes,
docs/benchmarks.md 11:44 UTC). Stacked by rows (stacking.py: codes, scales and zeros concatenated, the
compensators block-diagonal, rank r_q + r_k + r_v) they are one weight and one ``milo::int3_linear``,
given the diagonal blocks (``blocks``) so that the decode kernel's blocks read only their own
projection's ranks: without them every block multiplied all r_q + r_k + r_v ranks, and the 24-layer
Mixtral-shaped decode loop gained 1.3% instead of 7.8% (H100 2026-12-07 14:46-14:56 UTC).

transformers' attention modules call ``self.q_proj(hidden_states)``, then k_proj and v_proj, on the same
tensor, inside one forward. So the attention's forward is wrapped: it runs the stacked weight on its
input first and holds the three column slices of the result while the model's own forward runs; each
projection whose input *is* that tensor returns its slice, any other call (another input, a projection
called from outside) runs the projection's own weight. Under torch.compile the hand-off is traced away
(the identity test is decided at trace time), so the graph holds the one op. The stack is held in
non-persistent buffers, rebuilt when a state dict or a checkpoint (load_quantized) is loaded; the
projections' weights then point into it (their codes, scales, zeros and V are row slices of the stack's),
so the model holds the three projections once (a second copy was +0.34 GiB at 24 Mixtral-shaped layers,
2%). Only the compensators' U differ: the stack's is block-diagonal, each projection keeps its own. The
state dict keeps the projections' names and values (save_quantized and save_pretrained write each slice
on its own).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from milo_tensor.integrations.forward_swap import swap_forward
from milo_tensor.integrations.stacking import stack_rows, stackable
from milo_tensor.tensor import MiLoInt3Tensor

__all__ = ["fuse_qkv"]

logger = logging.getLogger(__name__)

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
_STACKED = ("qdata", "scales", "zeros", "ut", "v")  # the stacked weight's inner tensors, buffers milo_qkv_<name>


class _Pending:
    """The stacked projection's input and its three column slices, set for the duration of one attention
    forward (a plain object, so torch.compile traces its attribute writes as side effects)."""

    __slots__ = ("x", "parts")

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] | None = None


def _projection_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    pending, index = self._milo_qkv
    if pending.x is x:
        return pending.parts[index]
    return self._milo_unfused_cls.forward(self, x)


def _attention_forward(self: nn.Module, *args, **kwargs):
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    pending = self._milo_qkv_pending
    if hidden.dtype != self.milo_qkv_scales.dtype:
        raise ValueError(f"input dtype {hidden.dtype} does not match the q/k/v weights' {self.milo_qkv_scales.dtype}; "
                         f"cast the input or move the model with .to({hidden.dtype})")
    y = torch.ops.milo.int3_linear(hidden, *(getattr(self, f"milo_qkv_{n}") for n in _STACKED),
                                   self._milo_qkv_group_size, self.milo_qkv_bias, self._milo_qkv_blocks)
    pending.x, pending.parts = hidden, y.split(self._milo_qkv_sizes, dim=-1)
    try:
        return self._milo_unfused_cls.forward(self, *args, **kwargs)
    finally:
        pending.x = pending.parts = None


def _projections(attention: nn.Module) -> list[nn.Linear] | None:
    mods = [getattr(attention, name, None) for name in _PROJECTIONS]
    if all(isinstance(m, nn.Linear) for m in mods):
        return mods
    return None


def _stacked_bias(mods: list[nn.Linear]) -> torch.Tensor | None:
    if all(m.bias is None for m in mods):
        return None
    w = mods[0].weight
    return torch.cat([m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, dtype=w.dtype,
                                                                             device=w.device) for m in mods])


def _share_stack(mods: list[nn.Linear], stacked: MiLoInt3Tensor) -> None:
    """Each projection's weight rebuilt on its rows of the stack (views): one copy of the codes, scales,
    zeros and V in memory. Its U stays its own (the stack's is block-diagonal: a slice would be strided)."""
    n0 = r0 = 0
    for m in mods:
        w = m.weight.data if isinstance(m.weight, nn.Parameter) else m.weight
        n, r = w.shape[0], w.v.shape[0]
        rows = slice(n0, n0 + n)
        shared = w._with(qdata=stacked.qdata[rows], scales=stacked.scales[rows], zeros=stacked.zeros[rows],
                         v=stacked.v[r0:r0 + r])
        m.weight = nn.Parameter(shared, requires_grad=False)
        n0, r0 = n0 + n, r0 + r


def _refresh(attention: nn.Module, *_) -> None:
    """(Re)build the stacked weight and bias from the projections' current parameters, and point the
    projections into it. Held as plain tensors (the op's operands), not a MiLoInt3Tensor: a compiled step
    then unwraps no subclass for it."""
    mods = _projections(attention)
    stacked = stack_rows([m.weight.detach() for m in mods])
    _share_stack(mods, stacked)
    for n in _STACKED:
        setattr(attention, f"milo_qkv_{n}", getattr(stacked, n))
    attention.milo_qkv_bias = _stacked_bias(mods)
    attention._milo_qkv_group_size = stacked.group_size
    # (column end, rank end) per projection: the compensator's diagonal blocks, which the decode kernel
    # reads alone (a block of q's columns multiplies q's ranks only)
    ends = torch.tensor([[m.out_features, m.weight.ut.shape[0]] for m in mods]).cumsum(0)
    attention._milo_qkv_blocks = [int(b) for b in ends.flatten()]


def fuse_qkv(model: nn.Module) -> list[str]:
    """Run the q, k and v projections of every attention module of ``model`` as one int3 matmul.

    An attention module qualifies when it has ``q_proj``, ``k_proj`` and ``v_proj`` Linear layers whose
    weights are MiLo weights of one dtype, group size and input size with float compensators (Mixtral,
    Qwen2-MoE with its biases, Qwen3-MoE, OLMoE; DeepSeek's latent attention has no such trio and is left
    alone). Modules whose projections do not qualify are skipped and logged. Call it after ``quantize_``
    (or loading) with the model on its device, before ``torch.compile``; safe to call twice. Memory: the
    projections' codes, scales, zeros and V become views of the stack (held once); only the stack's
    block-diagonal U is new. Moving or casting the model afterwards (``.to()``) copies the views apart
    (correct, but the projections are then held twice): call it after the move. The state dict is
    unchanged, and loading a state dict or a checkpoint (load_quantized) rebuilds the stack.
    Returns the names of the fused modules.
    """
    fused = []
    for name, attention in model.named_modules():
        if hasattr(attention, "_milo_qkv_pending"):
            fused.append(name)
            continue
        mods = _projections(attention)
        if mods is None:
            continue
        weights = [m.weight for m in mods]
        if any(isinstance(w, DTensor) for w in weights):
            raise ValueError(f"{name}: its q/k/v projections are sharded (DTensor); fuse_qkv runs on an unsharded "
                             f"model (docs/distributed.md)")
        why = stackable([w.data if isinstance(w, nn.Parameter) else w for w in weights])
        if why is not None:
            logger.info("fuse_qkv: %s keeps separate projections: %s", name, why)
            continue
        for n in (*_STACKED, "bias"):
            attention.register_buffer(f"milo_qkv_{n}", None, persistent=False)
        _refresh(attention)
        attention._milo_qkv_sizes = [m.out_features for m in mods]
        attention._milo_qkv_pending = pending = _Pending()
        attention.register_load_state_dict_post_hook(_refresh)  # load_state_dict's and load_quantized's
        for index, mod in enumerate(mods):
            mod._milo_qkv = (pending, index)
            swap_forward(mod, _projection_forward, "MiLoQKV")
        swap_forward(attention, _attention_forward, "MiLoFusedQKV")
        fused.append(name)
    return fused
