"""The ``milo::`` custom ops: schemas, fake (meta) impls and the reference impl.

Custom ops, not raw kernel calls, so torch.compile(fullgraph=True) sees one opaque node per
matmul and CUDA-graph capture records whatever kernel the device registered. The reference impl
is registered for CompositeExplicitAutograd; a backend (CUDA, csrc/) registering its own impl for
the same op takes precedence on its device.
"""

from __future__ import annotations

import torch

from milo_tensor.ops import reference

_lib = torch.library.Library("milo", "FRAGMENT")

_lib.define(
    "int3_linear(Tensor x, Tensor qdata, Tensor scales, Tensor zeros, Tensor ut, Tensor v, "
    "int group_size, Tensor? bias=None, int[]? blocks=None) -> Tensor"
)
_lib.define(
    "int3_grouped_linear(Tensor x, Tensor offsets, Tensor qdata, Tensor scales, Tensor zeros, "
    "Tensor ut, Tensor v, int group_size, Tensor? x_rows=None, str activation='none', "
    "str out_activation='none', Tensor? ranks=None) -> Tensor"
)

# MoE routing glue around the grouped op: one launch each on CUDA instead of a dozen small ones
_lib.define("moe_route(Tensor expert_ids, int num_experts) -> (Tensor, Tensor, Tensor)")
_lib.define("moe_combine(Tensor out, Tensor row_of_choice, Tensor weights, Tensor offsets) -> Tensor")
# a top-k router's forward (its GEMM, softmax, top-k and renormalization) in one launch on CUDA (torch: six kernels)
_lib.define("router_topk(Tensor x, Tensor weight, int top_k, bool renormalize) -> (Tensor, Tensor, Tensor)")

_lib.impl("int3_linear", reference.int3_linear, "CompositeExplicitAutograd")
_lib.impl("int3_grouped_linear", reference.int3_grouped_linear, "CompositeExplicitAutograd")
_lib.impl("moe_route", reference.moe_route, "CompositeExplicitAutograd")
_lib.impl("moe_combine", reference.moe_combine, "CompositeExplicitAutograd")
_lib.impl("router_topk", reference.router_topk, "CompositeExplicitAutograd")


@torch.library.register_fake("milo::int3_linear")
def _int3_linear_fake(x, qdata, scales, zeros, ut, v, group_size, bias=None, blocks=None):
    torch._check(x.shape[-1] == v.shape[-1], lambda: "int3_linear: x's last dim must equal K")
    if blocks is not None:
        reference.check_blocks(blocks, qdata.shape[-2], ut.shape[0])
    return x.new_empty((*x.shape[:-1], qdata.shape[-2]))


@torch.library.register_fake("milo::int3_grouped_linear")
def _int3_grouped_linear_fake(x, offsets, qdata, scales, zeros, ut, v, group_size, x_rows=None, activation="none",
                              out_activation="none", ranks=None):
    k = v.shape[-1] * (2 if activation == "silu_mul" else 1)
    torch._check(x.shape[-1] == k, lambda: f"int3_grouped_linear: x must have {k} columns (activation={activation!r})")
    if ranks is not None:
        torch._check(ranks.shape == (qdata.shape[0],), lambda: "int3_grouped_linear: ranks must be [E] (one per expert)")
    rows = x.shape[0] if x_rows is None else x_rows.shape[0]
    return x.new_empty((rows, qdata.shape[-2] // (2 if out_activation == "silu_mul" else 1)))


@torch.library.register_fake("milo::moe_route")
def _moe_route_fake(expert_ids, num_experts):
    n = expert_ids.numel()
    return (expert_ids.new_empty((n,), dtype=torch.int32), expert_ids.new_empty((n,), dtype=torch.int32),
            expert_ids.new_empty((num_experts,), dtype=torch.int32))


@torch.library.register_fake("milo::moe_combine")
def _moe_combine_fake(out, row_of_choice, weights, offsets):
    torch._check(row_of_choice.numel() == weights.numel(), lambda: "moe_combine: one row per (token, choice)")
    return out.new_empty((weights.shape[0], out.shape[-1]))


@torch.library.register_fake("milo::router_topk")
def _router_topk_fake(x, weight, top_k, renormalize):
    torch._check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
                 lambda: "router_topk: x must be [tokens, hidden] and weight [experts, hidden]")
    torch._check(1 <= top_k <= weight.shape[0], lambda: "router_topk: top_k must be in [1, experts]")
    n = x.shape[0]
    return (x.new_empty((n, weight.shape[0])), x.new_empty((n, top_k), dtype=torch.float32),
            x.new_empty((n, top_k), dtype=torch.int64))


def _int3_linear_setup_context(ctx, inputs, output):
    x, qdata, scales, zeros, ut, v, group_size, bias, *_ = inputs  # blocks: U^T's zeros, nothing to add
    ctx.save_for_backward(qdata, scales, zeros, ut, v)
    ctx.group_size = group_size
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _int3_linear_backward(ctx, grad):
    """Gradient for the activations (and bias) only: the 3-bit weight is frozen, as in QLoRA."""
    qdata, scales, zeros, ut, v = ctx.saved_tensors
    w = reference.dequantize_int3(qdata, scales, zeros, ctx.group_size)
    if ut.shape[0] > 0:
        w = w + ut.to(torch.float32).T @ v.to(torch.float32)
    grad_x = (grad.to(torch.float32) @ w).to(ctx.x_dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, None, None, grad_bias, None


torch.library.register_autograd(
    "milo::int3_linear", _int3_linear_backward, setup_context=_int3_linear_setup_context
)
