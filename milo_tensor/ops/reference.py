"""Plain-torch implementations of the milo ops: the oracle for every kernel, and the CPU path.

They accumulate in float32 (float64 for float64 inputs) whatever the input dtype, so a kernel is
judged against the math, not against another low-precision path.
"""

from __future__ import annotations

import torch

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
) -> torch.Tensor:
    """y = x @ deq(Q).T + (x @ V.T) @ U.T (+ bias), accumulated in float32, returned in x.dtype."""
    acc = _accumulation_dtype(x.dtype)
    xf = x.to(acc)
    y = xf @ dequantize_int3(qdata, scales, zeros, group_size, acc).T
    if ut.shape[0] > 0:
        y = y + (xf @ v.to(acc).T) @ ut.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def int3_grouped_linear(
    x: torch.Tensor,
    offsets: torch.Tensor,
    qdata: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    ut: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """Rows of ``x`` sorted by expert; rows offsets[e-1]:offsets[e] use expert e. Rows past
    offsets[-1] (expert-parallel sentinels) are zero in the output."""
    n_experts, n = qdata.shape[0], qdata.shape[1]
    out = x.new_zeros(x.shape[0], n)
    bounds = [0] + offsets.tolist()
    for e in range(n_experts):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            out[start:end] = int3_linear(x[start:end], qdata[e], scales[e], zeros[e], ut[e], v[e], group_size)
    return out
