"""The "milo" experts implementation for transformers 5 MoE blocks.

transformers stores a layer's experts as 3D parameters and dispatches their forward through
``ExpertsInterface``. Registering "milo" there lets a quantized model run all experts of a layer
through two grouped custom ops (gate_up, then down) without patching model code: tokens are
sorted by expert with static shapes only (no host sync, no data-dependent sizes), so the step
compiles with fullgraph=True and can be captured in a CUDA graph once a device kernel backs the op.
"""

from __future__ import annotations

import torch
from transformers.activations import SiLUActivation
from transformers.integrations.moe import (
    ALL_EXPERTS_FUNCTIONS,
    ExpertsInterface,
    _default_apply_gate,
    grouped_mm_experts_forward,
)

from milo_tensor.tensor import MiLoInt3Tensor

EXPERTS_IMPLEMENTATION = "milo"

# Expert-module layouts the grouped op runs: the weights are E x N x K, without biases.
_UNSUPPORTED_FLAGS = {
    "is_transposed": "stores its experts transposed (E x K x N)",
    "has_bias": "has expert biases",
}


def expert_param_names(module: torch.nn.Module) -> tuple[str, ...]:
    """Names of the 3D expert weights of a transformers experts module (empty if it is not one)."""
    names = tuple(
        name for name in ("gate_up_proj", "up_proj", "down_proj")
        if isinstance(getattr(module, name, None), torch.Tensor) and getattr(module, name).ndim == 3
    )
    return names if "down_proj" in names else ()


def check_supported_experts(module: torch.nn.Module, fqn: str) -> None:
    """Refuse, naming the module, an experts layout the MiLo path cannot run."""
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if getattr(module, flag, False):
            raise ValueError(
                f"{fqn or type(module).__name__} ({type(module).__name__}) {what}, which MiLo does not "
                f"support yet; exclude it from quantization (filter_fn or FqnToConfig with None)"
            )


def _ranks_arg(w: MiLoInt3Tensor) -> torch.Tensor | None:
    """Each expert's rank for the grouped op where some expert's is below the stack's R (its compensator
    rows past it are zero padding, which the decode kernels then skip); None where every expert has R."""
    r_max = w.ut.shape[1]
    if r_max == 0 or min(w.ranks) >= r_max:
        return None
    if torch.compiler.is_compiling():  # a constant of the compiled graph (the cache is not traced)
        return torch.tensor(w.ranks, dtype=torch.int32, device=w.qdata.device)
    return w.ranks_tensor()


def _grouped(x: torch.Tensor, offsets: torch.Tensor, w: MiLoInt3Tensor, **input_kw) -> torch.Tensor:
    ut, v = w.compensator()
    return torch.ops.milo.int3_grouped_linear(x, offsets, w.qdata, w.scales, w.zeros, ut, v, w.group_size,
                                              ranks=_ranks_arg(w), **input_kw)


def _gate_is_silu_mul(module: torch.nn.Module) -> bool:
    """Whether the module gates with transformers' default silu(gate) * up of a concatenated
    [gate | up] output, which the gate_up projection's op then applies to its own output. Any
    other gate (a custom `_apply_gate`, interleaved halves, another activation) runs as the model
    defines it, between the two grouped ops."""
    return (
        getattr(module, "has_gate", False)
        and getattr(module, "is_concatenated", True)
        and getattr(type(module), "_apply_gate", None) is _default_apply_gate
        and type(getattr(module, "act_fn", None)) in (SiLUActivation, torch.nn.SiLU)
    )


def milo_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    up, down = getattr(self, up_name), self.down_proj
    if not (isinstance(up, MiLoInt3Tensor) and isinstance(down, MiLoInt3Tensor)):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    # Rows sorted by expert (ids outside [0, E), expert-parallel sentinels, fall past offsets[-1] and
    # come back as zeros), the two grouped matmuls, then the weighted sum per token: two routing
    # launches on CUDA in place of a sort, a histogram, a cumsum, gathers and a scatter. The first op
    # reads each sorted row's token itself (x_rows) and applies the default gate to its own output.
    n_experts = self.num_experts
    shared = getattr(self, "milo_shared", None)  # shared-expert pieces in the stacks (fuse_shared_experts)
    if shared is not None:
        n_experts = shared.routed + shared.count
        if shared.applies(self, hidden_states.shape[0]):  # (the shared MLP returns zero then: shared_experts.py)
            top_k_index, top_k_weights = shared.extend(hidden_states, top_k_index, top_k_weights)
    token_of_row, row_of_choice, offsets = torch.ops.milo.moe_route(top_k_index, n_experts)
    if _gate_is_silu_mul(self):
        h = _grouped(hidden_states, offsets, up, x_rows=token_of_row, out_activation="silu_mul")
    else:
        h = _grouped(hidden_states, offsets, up, x_rows=token_of_row)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    out = _grouped(h, offsets, down)
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    return torch.ops.milo.moe_combine(out, row_of_choice, top_k_weights, offsets).to(hidden_states.dtype)


def register() -> None:
    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(EXPERTS_IMPLEMENTATION, milo_experts_forward)


def use_milo_experts(module: torch.nn.Module, implementation: str = EXPERTS_IMPLEMENTATION) -> None:
    """Point a quantized experts module (and the model config it shares) at the milo path."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "_experts_implementation"):
        config._experts_implementation = implementation


register()
