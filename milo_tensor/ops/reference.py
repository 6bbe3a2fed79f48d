"""Plain-torch implementations of the milo ops: the oracle for every kernel, and the CPU path.

They accumulate in float32 (float64 for float64 inputs) whatever the input dtype, so a kernel is
judged against the math, not against another low-precision path.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from milo_tensor.quant.packing import unpack_int3


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def dequantize_int3(
    qdata: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Packed codes + per-group scale/zero -> weight [..., N, K] in ``dtype`` (float32 default)."""
    codes = unpack_int3(qdata).to(dtype)
    k = codes.shape[-1]
    grouped = codes.unflatten(-1, (k // group_size, group_size))
    w = (grouped - zeros.to(dtype).unsqueeze(-1)) * scales.to(dtype).unsqueeze(-1)
    return w.flatten(-2)


def int3_linear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    ut: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    blocks: Sequence[int] | None = None,
) -> torch.Tensor:
    """y = x @ deq(Q).T + (x @ V.T) @ U.T (+ bias), accumulated in float32, returned in x.dtype.

    ``blocks`` declares U^T block-diagonal (a stack of weights, ``stack_rows``): [column end, rank end] per
    segment, flattened, the last (N, R); U^T must be zero outside the blocks, so a kernel may skip them. The
    reference checks the declaration and multiplies the whole U^T."""
    if blocks is not None:
        check_blocks(blocks, qdata.shape[-2], ut.shape[0])
    acc = _accumulation_dtype(x.dtype)
    xf = x.to(acc)
    y = xf @ dequantize_int3(qdata, scales, zeros, group_size, acc).T
    if ut.shape[0] > 0:
        y = y + (xf @ v.to(acc).T) @ ut.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def check_blocks(blocks: Sequence[int], n: int, r: int) -> None:
    """int3_linear's ``blocks``: pairs (column end, rank end), column ends ascending, rank ends not descending,
    the last (N, R)."""
    blocks = [int(b) for b in blocks]
    if len(blocks) < 2 or len(blocks) % 2:
        raise ValueError(f"int3_linear: blocks is [column end, rank end] per segment, flattened; got {blocks}")
    cols, ranks = blocks[0::2], blocks[1::2]
    if any(b <= a for a, b in zip([0, *cols], cols)) or any(b < a for a, b in zip([0, *ranks], ranks)):
        raise ValueError(f"int3_linear: blocks' column ends must ascend and rank ends not descend; got {blocks}")
    if (cols[-1], ranks[-1]) != (n, r):
        raise ValueError(f"int3_linear: the last block must end at (N, R) = ({n}, {r}); got {blocks}")


ACTIVATIONS = ("none", "silu_mul")


def _check_activation(activation: str, name: str = "activation") -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"int3_grouped_linear: unknown {name} {activation!r}; use one of {ACTIVATIONS}")


def gate(x: torch.Tensor, activation: str) -> torch.Tensor:
    """``silu(gate) * up`` of the ``[gate | up]`` halves of x's rows in x's dtype for ``"silu_mul"``,
    as transformers' experts apply their default gate; x itself for ``"none"``."""
    if activation == "silu_mul":
        gate_half, up = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate_half) * up
    return x


def grouped_input(x: torch.Tensor, x_rows: torch.Tensor | None, activation: str) -> torch.Tensor:
    """The grouped op's input rows: ``x[x_rows]`` when given (an index outside ``[0, x.shape[0])``
    reads a zero row), then gated by ``activation`` (``gate``). Lets the op take the router's token
    indices and the gate_up output directly, so no gather or activation runs between launches."""
    _check_activation(activation)
    if x_rows is not None:
        if x_rows.dim() != 1 or x_rows.is_floating_point() or x_rows.dtype == torch.bool:
            raise ValueError(f"int3_grouped_linear: x_rows must be a 1-D integer tensor, got {x_rows.dtype} {tuple(x_rows.shape)}")
        idx = x_rows.long()
        outside = (idx < 0) | (idx >= x.shape[0])
        if x.shape[0] == 0:
            x = x.new_zeros(idx.numel(), x.shape[1])
        else:
            x = x[idx.clamp(0, x.shape[0] - 1)].masked_fill(outside[:, None], 0)
    return gate(x, activation)


def int3_grouped_linear(
    x: torch.Tensor,
    offsets: torch.Tensor,
    qdata: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    ut: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    x_rows: torch.Tensor | None = None,
    activation: str = "none",
    out_activation: str = "none",
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows of the input (``grouped_input``: x, or x gathered by ``x_rows``, gated by ``activation``)
    sorted by expert; rows offsets[e-1]:offsets[e] use expert e. Rows past offsets[-1]
    (expert-parallel sentinels) are zero in the output. ``out_activation="silu_mul"`` gates the
    output's ``[gate | up]`` halves (N / 2 columns): the gate_up projection hands the down projection
    its input ready, which the CUDA decode kernel writes from its epilogue. ``ranks`` ([E] integers):
    expert e's low-rank term runs over its first ``ranks[e]`` ranks only. A MiLoInt3Tensor's rows past an
    expert's rank are zero padding, so the result is the same, and the CUDA kernels skip that work: their
    t = x·Vᵀ is zero there without V being read, and the decode kernel's epilogue stops at the expert's
    rank (the tensor-core kernels' multiplies those zeros by U's padding, which must be finite)."""
    _check_activation(out_activation, "out_activation")
    expert_ranks = _expert_ranks(ranks, qdata.shape[0], ut.shape[1])
    if out_activation == "silu_mul" and qdata.shape[1] % 2:
        raise ValueError(f"int3_grouped_linear: out_activation='silu_mul' gates [gate | up] halves, so N must be "
                         f"even; got N = {qdata.shape[1]}")
    x = grouped_input(x, x_rows, activation)
    if x.shape[-1] != v.shape[-1]:
        raise ValueError(
            f"int3_grouped_linear: the input has {x.shape[-1]} columns, the weights K = {v.shape[-1]} "
            f"(activation='silu_mul' takes [gate | up], 2K columns)"
        )
    n_experts, n = qdata.shape[0], qdata.shape[1]
    out = x.new_zeros(x.shape[0], n)
    bounds = [0] + offsets.tolist()
    for e in range(n_experts):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            r = expert_ranks[e]
            out[start:end] = int3_linear(x[start:end], qdata[e], scales[e], zeros[e], ut[e, :r], v[e, :r], group_size)
    return gate(out, out_activation)


def _expert_ranks(ranks: torch.Tensor | None, n_experts: int, r_max: int) -> list[int]:
    """Each expert's rank, clamped to [0, R] (R for all without ``ranks``)."""
    if ranks is None:
        return [r_max] * n_experts
    if ranks.dim() != 1 or ranks.numel() != n_experts or ranks.is_floating_point() or ranks.dtype == torch.bool:
        raise ValueError(f"int3_grouped_linear: ranks must be a 1-D integer tensor of the {n_experts} experts' ranks, "
                         f"got {ranks.dtype} {tuple(ranks.shape)}")
    return [min(max(int(r), 0), r_max) for r in ranks.tolist()]


def moe_route(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort a layer's (token, choice) pairs by expert, stably, with static output shapes.

    ``expert_ids`` is ``[tokens, top_k]``; ids outside ``[0, num_experts)`` (expert-parallel
    sentinels) sort after every expert and so fall past ``offsets[-1]``. Returns, all int32:
    ``token_of_row [tokens*top_k]`` (the token each sorted row reads), ``row_of_choice
    [tokens*top_k]`` (the sorted row of each flattened (token, choice)) and ``offsets [num_experts]``
    (end row of each expert, the grouped op's input)."""
    if expert_ids.is_floating_point() or expert_ids.is_complex() or expert_ids.dtype == torch.bool:
        raise ValueError(f"moe_route: expert_ids must be an integer tensor (the router's top-k indices), got {expert_ids.dtype}")
    if num_experts < 0:
        raise ValueError(f"moe_route: num_experts must be >= 0, got {num_experts}")
    flat = expert_ids.reshape(-1).long()
    keys = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    _, perm = torch.sort(keys, stable=True)
    top_k = expert_ids.shape[-1] if expert_ids.dim() > 0 else 1
    token_of_row = (perm // max(top_k, 1)).to(torch.int32)
    row_of_choice = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
    offsets = torch.cumsum(torch.bincount(keys, minlength=num_experts + 1)[:num_experts], 0)
    return token_of_row, row_of_choice.to(torch.int32), offsets.to(torch.int32)


def router_topk(
    x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A top-k router's forward as transformers' Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE routers compute it:
    logits = x @ weight.T (in x's dtype, as F.linear), softmax over the experts in float32, the top_k largest
    (descending, as torch.topk), divided by their sum when ``renormalize``. Returns (logits [tokens, experts],
    weights float32 [tokens, top_k], expert indices int64 [tokens, top_k]); the CUDA impl breaks ties between
    equal logits toward the lower expert index."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"router_topk: x must be [tokens, hidden] and weight [experts, hidden], got shapes {tuple(x.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if not 1 <= top_k <= weight.shape[0]:
        raise ValueError(f"router_topk: top_k must be in [1, {weight.shape[0]}] (the experts), got {top_k}")
    logits = F.linear(x, weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights, indices


def moe_combine(
    out: torch.Tensor, row_of_choice: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """y[t] = sum over j of weights[t, j] * out[row_of_choice[t*k + j]], in float32 and in j order;
    rows past ``offsets[-1]`` (dropped choices) add nothing, whatever their weight. Returns
    ``[tokens, H]`` in ``out.dtype``."""
    if weights.dim() != 2 or out.dim() != 2:
        raise ValueError(
            f"moe_combine: weights must be [tokens, top_k] and out [rows, H], got {tuple(weights.shape)} and {tuple(out.shape)}"
        )
    if row_of_choice.numel() != weights.numel():
        raise ValueError(
            f"moe_combine: row_of_choice must have one row per (token, choice), {weights.numel()} here, got "
            f"{row_of_choice.numel()} (pass moe_route's second output)"
        )
    tokens, top_k = weights.shape
    acc = _accumulation_dtype(out.dtype)
    end = offsets[-1] if offsets.numel() > 0 else torch.zeros((), dtype=offsets.dtype, device=offsets.device)
    rows = row_of_choice.long()
    keep = (rows < end).reshape(tokens, top_k)
    w = torch.where(keep, weights.to(acc), torch.zeros((), dtype=acc, device=weights.device))
    picked = out.to(acc)[rows.clamp(max=max(out.shape[0] - 1, 0))].reshape(tokens, top_k, -1)
    picked = torch.where(keep.unsqueeze(-1), picked, torch.zeros((), dtype=acc, device=out.device))
    y = torch.zeros(tokens, out.shape[-1], dtype=acc, device=out.device)
    for j in range(top_k):
        y = y + w[:, j, None] * picked[:, j]
    return y.to(out.dtype)
