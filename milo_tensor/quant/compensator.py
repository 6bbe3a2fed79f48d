"""The MiLo loop: 3-bit codes plus the low-rank compensator that wins back what 3 bits lose.

Alternate Q ← quantize(W − U V); E ← W − deq(Q); (U, V) ← best rank-r factors of E (√S on both
sides), and keep each expert's best iterate by ‖W − deq(Q) − U V‖. All experts of a stack go
through each step together (one batched quantize, one batched SVD at the largest rank with the
extra columns masked), so a whole layer costs a few large GEMMs per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from milo_tensor.quant.affine import AffineQuantized, check_weight, quantize_rtn
from milo_tensor.quant.hqq import quantize_hqq

QUANTIZERS = ("hqq", "rtn")
SVD_METHODS = ("auto", "exact", "randomized")
# Below this inner size an exact SVD is cheap; above it the randomized range finder (with power
# iterations and oversampling) recovers the top-r subspace at a fraction of the cost.
EXACT_SVD_MAX_DIM = 1024
_OVERSAMPLE = 16
_POWER_ITERS = 4


@dataclass
class MiLoResult:
    quantized: AffineQuantized  # codes [..., N, K]; scale/zero [..., N, K/g]
    u: torch.Tensor  # float32 [..., N, R]; columns past an expert's rank are zero
    v: torch.Tensor  # float32 [..., R, K]; rows past an expert's rank are zero
    ranks: tuple[int, ...]
    rel_error: tuple[float, ...]  # ‖W − deq(Q) − UV‖_F / ‖W‖_F per expert, of the kept iterate


def _normalize_ranks(ranks: int | Sequence[int], n_experts: int, n: int, k: int) -> tuple[int, ...]:
    ranks = (ranks,) * n_experts if isinstance(ranks, int) else tuple(int(r) for r in ranks)
    if len(ranks) != n_experts:
        raise ValueError(f"got {len(ranks)} ranks for {n_experts} experts")
    for r in ranks:
        if r < 0:
            raise ValueError(f"ranks must be >= 0, got {r}")
        if r > min(n, k):
            raise ValueError(
                f"rank {r} is larger than min(N, K) = {min(n, k)} of a weight of shape (N={n}, K={k}); "
                f"choose a rank <= {min(n, k)}"
            )
    return ranks


def _quantizer(name: str):
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; choose one of {QUANTIZERS}")
    return quantize_hqq if name == "hqq" else quantize_rtn


def _randomized_svd(e: torch.Tensor, q: int, generator: torch.Generator):
    """Top-q SVD of a batch of matrices by a seeded range finder with power iterations."""
    omega = torch.randn(*e.shape[:-2], e.shape[-1], q, generator=generator, device=e.device, dtype=e.dtype)
    basis = torch.linalg.qr(e @ omega).Q
    for _ in range(_POWER_ITERS):
        basis = torch.linalg.qr(e.mT @ basis).Q
        basis = torch.linalg.qr(e @ basis).Q
    u_small, s, vh = torch.linalg.svd(basis.mT @ e, full_matrices=False)
    return basis @ u_small, s, vh


def low_rank_factors(e: torch.Tensor, rank: int, method: str = "auto", generator: torch.Generator | None = None):
    """(U [.., N, r], V [.., r, K]) with U V the best rank-r approximation of e, √S on each side."""
    if method not in SVD_METHODS:
        raise ValueError(f"unknown svd method {method!r}; choose one of {SVD_METHODS}")
    n, k = e.shape[-2:]
    inner = min(n, k)
    exact = method == "exact" or (method == "auto" and (inner <= EXACT_SVD_MAX_DIM or rank + _OVERSAMPLE >= inner))
    if exact:
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
    else:
        generator = generator or torch.Generator(device=e.device).manual_seed(0)
        u, s, vh = _randomized_svd(e, min(rank + _OVERSAMPLE, inner), generator)
    root = s[..., :rank].sqrt()
    return u[..., :rank] * root.unsqueeze(-2), root.unsqueeze(-1) * vh[..., :rank, :]


def milo_compress(
    w: torch.Tensor,
    ranks: int | Sequence[int],
    *,
    bits: int = 3,
    group_size: int = 64,
    iters: int = 20,
    quantizer: str = "hqq",
    qparam_dtype: torch.dtype | None = None,
    svd: str = "auto",
    seed: int = 0,
    progress: bool = False,
) -> MiLoResult:
    """Compress W (N × K, or E × N × K) into 3-bit codes plus per-expert rank-r compensators.

    Deterministic for a given ``seed`` (the randomized SVD draws from its own generator).
    """
    check_weight(w, group_size)
    quantize = _quantizer(quantizer)
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    stacked = w.ndim == 3
    weights = (w if stacked else w.unsqueeze(0)).float()
    n_experts, n, k = weights.shape
    ranks = _normalize_ranks(ranks, n_experts, n, k)
    r_max = max(ranks)
    norms = weights.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)

    def quant(x):
        return quantize(x, bits, group_size, qparam_dtype=qparam_dtype)

    u = weights.new_zeros(n_experts, n, r_max)
    v = weights.new_zeros(n_experts, r_max, k)
    best = quant(weights)
    best_u, best_v = u, v
    best_err = (weights - best.dequantize()).flatten(1).norm(dim=1) / norms
    if r_max > 0:
        keep = (torch.arange(r_max, device=w.device) < torch.tensor(ranks, device=w.device).unsqueeze(1)).float()
        generator = torch.Generator(device=w.device).manual_seed(seed)
        for _ in tqdm(range(max(iters, 1)), desc="MiLo", disable=not progress, leave=False):
            q = quant(weights - u @ v)
            residual = weights - q.dequantize()
            u, v = low_rank_factors(residual, r_max, svd, generator)
            u, v = u * keep.unsqueeze(1), v * keep.unsqueeze(2)
            err = (residual - u @ v).flatten(1).norm(dim=1) / norms
            better = err < best_err
            pick = lambda new, old: torch.where(better.view(-1, *[1] * (new.ndim - 1)), new, old)  # noqa: E731
            best = AffineQuantized(pick(q.codes, best.codes), pick(q.scale, best.scale), pick(q.zero, best.zero), group_size, bits)
            best_u, best_v = pick(u, best_u), pick(v, best_v)
            best_err = torch.minimum(err, best_err)
    if not stacked:
        best = AffineQuantized(best.codes[0], best.scale[0], best.zero[0], group_size, bits)
        best_u, best_v = best_u[0], best_v[0]
    return MiLoResult(best, best_u, best_v, ranks, tuple(best_err.tolist()))


def quantize_compensator(m: torch.Tensor, bits: int, group_size: int) -> AffineQuantized:
    """Round-to-nearest of each row of a compensator factor (Uᵀ or V) along its length."""
    if bits not in (3, 8):
        raise ValueError(f"compensator bits must be 3 or 8, got {bits}")
    if m.shape[-1] % group_size:
        raise ValueError(
            f"a compensator row of length {m.shape[-1]} is not a multiple of the compensator group size "
            f"{group_size}; pick a compensator_group_size that divides {m.shape[-1]}"
        )
    return quantize_rtn(m, bits, group_size)
