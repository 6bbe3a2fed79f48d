"""Shared experts as extra experts of a MoE layer's grouped launch (DeepSeek-V2/V3, Qwen2-MoE style).

A shared-expert MLP runs for every token beside the routed experts: on the milo path that is three
more dense int3 matmuls (each a t kernel and a decode kernel), torch's activation, and an add, one
after the other: about 40% of a DeepSeek-V2-Lite-shaped layer's kernel time at M=1 (an eager profile,
docs/kernel.md). Its intermediate width is S times the routed experts' I, so it cuts into S
expert-shaped pieces -- gate/up rows p·I .. (p+1)·I and the down columns that read them -- whose
outputs sum to the MLP's. Appended to the experts' stacks, the pieces ride in the same
grouped launches, every token routed to each of them with weight 1 (or the model's sigmoid gate).

The pieces are exact slices of the quantized MLP: codes, scales and zeros are cut along their rows
(gate/up) or groups (down); a down piece keeps U and its columns of V; a gate/up piece stacks the two
compensators block-diagonally (rank r_gate + r_up, stacking.py), so nothing is re-quantized. The stacks' compensator
rank grows to the pieces' where it is larger (the routed experts' padding, which the decode kernels skip).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from milo_tensor.integrations import distributed as slicing
from milo_tensor.integrations.experts import EXPERTS_IMPLEMENTATION, _gate_is_silu_mul
from milo_tensor.integrations.forward_swap import swap_forward
from milo_tensor.integrations.stacking import stack_rows
from milo_tensor.tensor import MiLoInt3Tensor

__all__ = ["fuse_shared_experts", "SharedExperts"]

logger = logging.getLogger(__name__)

# rows per busy expert up to which the grouped op runs its decode kernel (int3_grouped_linear's rule):
# the default token bound of a fused layer is the batch that keeps every expert within it
_DECODE_ROWS_PER_EXPERT = 4
_MLP_NAMES = ("shared_experts", "shared_expert")  # DeepSeek-V2/V3, GLM4-MoE... / Qwen2-MoE


@dataclass
class SharedExperts:
    """What a fused experts module needs to route its tokens to the shared pieces as well."""

    count: int  # pieces appended after the routed experts
    routed: int  # routed experts (the router's ids are below it)
    max_tokens: int  # batches up to this many tokens take the pieces; larger ones run the MLP itself
    gate: tuple[nn.Module, ...] = ()  # Qwen2-MoE's shared_expert_gate (H -> 1, sigmoid), not registered here
    _cache: dict = field(default_factory=dict, repr=False)

    def applies(self, experts: nn.Module, tokens: int) -> bool:
        """Whether this call of the experts module routes the tokens to the pieces (and the MLP returns zero):
        on the milo path (another experts implementation, e.g. eager, sees only the routed experts) and within
        the token bound. The one decision both sides of the layer ask."""
        implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
        return implementation == EXPERTS_IMPLEMENTATION and tokens <= self.max_tokens

    def extend(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor):
        """The router's choices plus one column per piece: its expert id and weight 1, or sigmoid(gate(x))."""
        ids, ones = self._columns(index, weights)
        w = torch.sigmoid(self.gate[0](hidden)).to(weights.dtype).expand_as(ones) if self.gate else ones
        return torch.cat([index, ids], 1), torch.cat([weights, w], 1)

    def _columns(self, index: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pieces' id and weight-1 columns for this many tokens: made once per shape in eager mode (two
        fewer kernels a call), graph constants when compiled."""
        def make() -> tuple[torch.Tensor, torch.Tensor]:
            ids = torch.arange(self.routed, self.routed + self.count, device=index.device, dtype=index.dtype)
            return ids.expand(index.shape[0], self.count), weights.new_ones(index.shape[0], self.count)

        if torch.compiler.is_compiling():
            return make()
        key = (index.shape[0], index.device, index.dtype, weights.dtype)
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


def _mlp_weights(mlp: nn.Module, fqn: str) -> tuple[MiLoInt3Tensor, MiLoInt3Tensor, MiLoInt3Tensor]:
    """gate, up and down of a shared-expert MLP the fusion can cut, or a ValueError naming what is not."""
    weights = []
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, name, None)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{fqn}: a shared-expert MLP needs gate_proj, up_proj and down_proj Linear layers; "
                             f"{name} is {type(lin).__name__}")
        if lin.bias is not None:
            raise ValueError(f"{fqn}.{name} has a bias, which the grouped op does not add; leave this layer unfused")
        if not isinstance(lin.weight, MiLoInt3Tensor):
            raise ValueError(f"{fqn}.{name} is not quantized (its weight is {type(lin.weight).__name__}): quantize "
                             f"the shared experts with the model (milo_int3) before fusing them")
        weights.append(lin.weight)
    if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLUActivation", "SiLU"):
        raise ValueError(f"{fqn}: only silu(gate) * up MLPs fuse (act_fn is {type(getattr(mlp, 'act_fn', None)).__name__})")
    return tuple(weights)


def _check_compatible(w: MiLoInt3Tensor, stack: MiLoInt3Tensor, what: str) -> None:
    if w.comp_bits is not None or stack.comp_bits is not None:
        raise ValueError(f"{what}: fusing shared experts needs float compensators (quantized with "
                         f"compensator_bits=None); this one has {w.comp_bits or stack.comp_bits}-bit U and V")
    if w.transposed or w.dtype != stack.dtype or w.group_size != stack.group_size:
        raise ValueError(f"{what}: the shared MLP ({w.dtype}, group {w.group_size}) and the routed experts "
                         f"({stack.dtype}, group {stack.group_size}) are stored differently; they cannot share a stack")


def _as_expert(w: MiLoInt3Tensor) -> MiLoInt3Tensor:
    """A 2D weight as a stack of one expert."""
    names = w.__tensor_flatten__()[0]
    return w._with(**{n: getattr(w, n).unsqueeze(0) for n in names}, shape=(1, *w.shape), ranks=(w.ut.shape[0],))


def shared_pieces(gate: MiLoInt3Tensor, up: MiLoInt3Tensor, down: MiLoInt3Tensor, width: int):
    """The MLP cut into expert-shaped pieces of intermediate width ``width``: (gate_up stack, down stack)."""
    inter = gate.shape[0]
    if inter % width:
        raise ValueError(f"the shared MLP's intermediate size {inter} is not a multiple of the routed experts' "
                         f"{width}, so it does not cut into expert-shaped pieces")
    gate_up, downs = [], []
    for s in range(0, inter, width):
        gate_up.append(_as_expert(stack_rows([slicing.narrow(gate, 0, s, width), slicing.narrow(up, 0, s, width)])))
        downs.append(_as_expert(slicing.narrow(down, 1, s, width)))  # checks the cut falls on a group boundary
    return slicing.cat(gate_up, 0), slicing.cat(downs, 0)


def _shared_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fused MLP's forward: zero where the experts' launch computed it, else the MLP itself."""
    experts = self._milo_experts[0]
    if experts.milo_shared.applies(experts, x.numel() // x.shape[-1]):
        return x.new_zeros(())  # added to the experts' output, which already holds the MLP's
    return self._milo_unfused_cls.forward(self, x)


def _mark_fused(mlp: nn.Module, experts: nn.Module) -> None:
    """Swap the MLP's class for a subclass whose forward defers to the experts' launch: its modules and
    parameters (and so its state dict) stay as they are."""
    swap_forward(mlp, _shared_forward, "MiLoFused")
    mlp._milo_experts = (experts,)  # a tuple: not registered as a submodule


def _routed_state(routed: int, padded_ranks: dict[str, int]):
    """State-dict hook: the experts' stacks saved as the routed experts alone (the pieces come from the MLP's
    own parameters), padded to the rank they had before fusion, so a fused model saves like the unfused one."""

    def hook(module, state_dict, prefix, local_metadata):
        for name, r in padded_ranks.items():
            key = prefix + name
            if key not in state_dict:
                continue
            w = state_dict[key]
            part = slicing.narrow(w.data if isinstance(w, nn.Parameter) else w, 0, 0, routed)
            state_dict[key] = part._with(ut=part.ut[:, :r].contiguous(), v=part.v[:, :r].contiguous())
        return state_dict

    return hook


def _refuse_load(module, state_dict, prefix, *args):
    raise RuntimeError(f"{prefix.rstrip('.') or 'the experts module'}: its shared experts are fused into the experts' "
                       f"stacks (fuse_shared_experts); load the checkpoint into the unfused model, then fuse")


def fuse_shared_experts(model: nn.Module, max_tokens: int | None = None) -> list[str]:
    """Run each quantized MoE layer's shared-expert MLP inside its experts' grouped launches.

    For every module with a milo experts child (``experts``) and a shared MLP (``shared_experts`` or
    ``shared_expert``, with Qwen2-MoE's ``shared_expert_gate`` as the pieces' routing weight), appends
    the MLP's pieces to the experts' stacks. A batch of at most ``max_tokens`` tokens (default: as many
    as keep every expert, pieces included, at 4 rows on average, where the grouped op runs its decode
    kernel) routes every token to the pieces too and the MLP returns zero; larger batches run the MLP
    itself. The MLP's parameters stay where they were, and the experts' stacks are saved without the
    pieces, so a fused model saves like the unfused one; loading into a fused model is refused. Memory:
    the pieces are a second copy of the shared MLP, and the routed experts' compensator padding grows to
    the pieces' rank where it is larger (logged). Call it after ``quantize_`` (or loading) and before
    ``torch.compile``, on an unsharded model (a sharded one is refused, and so is an expert-parallel split
    of a fused one: docs/distributed.md). Returns the names of the fused layers.
    """
    fused = []
    for name, block in model.named_modules():
        experts = getattr(block, "experts", None)
        mlp_name = next((n for n in _MLP_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
        if experts is None or mlp_name is None or getattr(experts, "milo_shared", None) is not None:
            continue
        up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        mlp = getattr(block, mlp_name)
        if any(isinstance(t, DTensor) for t in (up, down, *(p for p in mlp.parameters()))):
            raise ValueError(f"{name}: its experts or shared MLP are sharded (DTensor); fuse_shared_experts runs on an "
                             f"unsharded model (docs/distributed.md)")
        if not (isinstance(up, MiLoInt3Tensor) and isinstance(down, MiLoInt3Tensor) and up.ndim == 3):
            continue  # not a milo experts module
        fqn = f"{name}.{mlp_name}" if name else mlp_name
        if not _gate_is_silu_mul(experts):
            raise ValueError(f"{name}.experts does not gate with silu(gate) * up of [gate | up]; its shared MLP "
                             f"cannot ride in its launches")
        gate_w, up_w, down_w = _mlp_weights(mlp, fqn)
        for w, stack in ((gate_w, up), (up_w, up), (down_w, down)):
            _check_compatible(w, stack, fqn)
        routed, width = up.shape[0], down.shape[-1]
        pieces_up, pieces_down = shared_pieces(gate_w, up_w, down_w, width)
        count = pieces_up.shape[0]
        router = getattr(block, "gate", None)
        top_k = getattr(router, "top_k", None) or getattr(getattr(experts, "config", None), "num_experts_per_tok", None)
        if top_k is None:
            raise ValueError(f"{name}: cannot tell the router's top_k (no gate.top_k or config.num_experts_per_tok)")
        bound = max_tokens if max_tokens is not None else (
            _DECODE_ROWS_PER_EXPERT * (routed + count) // (top_k + count))
        gate_mod = getattr(block, "shared_expert_gate", None)
        if gate_mod is not None and not (isinstance(gate_mod, nn.Linear) and gate_mod.out_features == 1):
            raise ValueError(f"{name}.shared_expert_gate must be a Linear to one output (a sigmoid gate per token)")
        before = up.storage_nbytes() + down.storage_nbytes()
        new_up, new_down = slicing.cat([up, pieces_up], 0), slicing.cat([down, pieces_down], 0)
        experts.gate_up_proj = nn.Parameter(new_up, requires_grad=False)
        experts.down_proj = nn.Parameter(new_down, requires_grad=False)
        experts.milo_shared = SharedExperts(count, routed, bound, (gate_mod,) if gate_mod is not None else ())
        experts._register_state_dict_hook(_routed_state(routed, {"gate_up_proj": up.ut.shape[1],
                                                                "down_proj": down.ut.shape[1]}))
        experts._register_load_state_dict_pre_hook(_refuse_load, with_module=True)
        _mark_fused(mlp, experts)
        logger.info("%s: shared MLP fused as %d experts (batches up to %d tokens); experts' stacks %.1f -> %.1f MiB",
                    fqn, count, bound, before / 2**20, (new_up.storage_nbytes() + new_down.storage_nbytes()) / 2**20)
        fused.append(name)
    return fused
