"""Several unrelated 2D MiLo weights of one input as one weight, each keeping its own compensator exactly.

Two fusions need it: a shared-expert MLP's gate and up halves (shared_experts.py) and an attention's
q, k and v projections (qkv.py). Codes, scales and zeros are stacked by rows; the compensators are
stacked block-diagonally -- U^T's rows of weight i are zero outside weight i's columns and V's rows are
weight i's -- so W_i's rows of the stack are deq(Q_i) + U_i V_i, nothing is re-quantized, and the rank
of the stack is the sum of the ranks.
"""

from __future__ import annotations

from typing import Sequence

import torch

from milo_tensor.tensor import MiLoInt3Tensor

__all__ = ["stack_rows", "stackable"]


def stackable(weights: Sequence[torch.Tensor]) -> str | None:
    """Why ``weights`` cannot be stacked by :func:`stack_rows`, or None where they can."""
    if not all(isinstance(w, MiLoInt3Tensor) for w in weights):
        kinds = sorted({type(w).__name__ for w in weights})
        return f"not every weight is a MiLoInt3Tensor ({', '.join(kinds)}): quantize them all with milo_int3"
    base = weights[0]
    for w in weights:
        if w.ndim != 2 or w.transposed:
            return f"a weight of shape {tuple(w.shape)} is not a 2D Linear weight"
        if w.comp_bits is not None:
            return f"a weight has a {w.comp_bits}-bit compensator; only float compensators (compensator_bits=None) stack"
        if (w.dtype, w.group_size, w.shape[1], w.device) != (base.dtype, base.group_size, base.shape[1], base.device):
            return (f"the weights differ in dtype, group size, input size or device ({w.dtype}, group {w.group_size}, "
                    f"K={w.shape[1]}, {w.device} vs {base.dtype}, group {base.group_size}, K={base.shape[1]}, "
                    f"{base.device})")
    return None


def stack_rows(weights: Sequence[MiLoInt3Tensor]) -> MiLoInt3Tensor:
    """[W_0; W_1; ...] as one N_0 + N_1 + ... by K weight of rank R_0 + R_1 + ... (U block-diagonal)."""
    weights = list(weights)
    why = stackable(weights)
    if why is not None:
        raise ValueError(f"stack_rows: {why}")
    ranks = [w.ut.shape[0] for w in weights]
    rows = [w.shape[0] for w in weights]
    base = weights[0]
    ut = base.ut.new_zeros(sum(ranks), sum(rows))
    r0 = n0 = 0
    for w, r, n in zip(weights, ranks, rows):
        ut[r0:r0 + r, n0:n0 + n] = w.ut
        r0, n0 = r0 + r, n0 + n
    return base._with(qdata=torch.cat([w.qdata for w in weights]), scales=torch.cat([w.scales for w in weights]),
                      zeros=torch.cat([w.zeros for w in weights]), ut=ut, v=torch.cat([w.v for w in weights]),
                      shape=(sum(rows), base.shape[1]), ranks=(sum(ranks),))
