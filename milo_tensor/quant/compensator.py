"""The MiLo loop: 3-bit codes plus the low-rank compensator that wins back what 3 bits lose.

For each weight W (or each expert of an [E, N, K] stack), alternate T times

    Q ← quantize(W − U V);   E ← W − deq(Q);   (U, V) ← best rank-r factors of E (√S on each side)

and keep, per expert, the iterate with the smallest ‖W − deq(Q) − U V‖_F. The quantizer sees the
part of W the compensator cannot express, and the compensator fits what the quantizer got wrong.

Everything is batched over experts: one quantize call and one SVD per iteration for the whole
stack, computed at the largest rank R and masked per expert (the top-r_e factors of a truncated
SVD are a prefix of the top-R ones), so an expert of rank r_e < R has exactly-zero columns/rows
past r_e. float32 inside, on the weight's device; no Python loop over experts or rows.

The truncated SVD (``svd=``):
- ``"exact"``: ``torch.linalg.svd`` (batched). Exact, but O(N K min(N, K)): fine for small
  matrices, seconds per call for a 4096 × 4096 GPU weight, far too slow for 8 × 14336 × 4096.
- ``"lowrank"``: randomized subspace iteration (Halko, Martinsson & Tropp) with oversampling, QR
  re-orthonormalization after every product (so float32 keeps the small directions), and a
  Rayleigh–Ritz step, i.e. what ``torch.svd_lowrank`` does, plus a warm start: each MiLo
  iteration starts from the previous iteration's top-R right singular vectors. E changes little
  between iterations, so the subspace keeps converging across the loop (~2 power steps per
  iteration, T of them in total) and the cost stays a few GEMMs per iteration.
- ``"auto"`` (default): exact when the matrix is tiny (min(N, K) <= 64; measured on 2 CPU
  threads, the warm-started sketch of a rank-8 [8, 256, 256] stack is already 13x faster than the
  exact SVD at the same error) or the rank is large relative to it (4·(R + oversampling) >
  min(N, K): then the randomized sketch is nearly as large as the matrix and saves nothing);
  randomized otherwise,
  i.e. when r ≪ min(N, K), where it recovers the top-r subspace accurately at a fraction of the
  cost. The choice is per call (one shape and one R for the whole stack).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from milo_tensor.quant.affine import AffineQuantized, check_bits, check_weight, quantize_rtn
from milo_tensor.quant.hqq import quantize_hqq

__all__ = [
    "MiLoResult",
    "milo_compress",
    "quantize_compensator",
    "truncated_svd",
    "low_rank_factors",
    "choose_svd",
    "QUANTIZERS",
    "SVD_METHODS",
]

QUANTIZERS = ("hqq", "rtn")
SVD_METHODS = ("auto", "exact", "lowrank")
_SVD_ALIASES = {"randomized": "lowrank", "svd_lowrank": "lowrank", "linalg": "exact"}

EXACT_SVD_MAX_DIM = 64  # "auto": exact SVD at or below this min(N, K)
_MIN_OVERSAMPLE = 8
_COLD_POWER_ITERS = 4  # power iterations from a random start
_WARM_POWER_ITERS = 2  # ... from the previous MiLo iteration's subspace


@dataclass
class MiLoResult:
    """What :func:`milo_compress` returns (shapes for a weight ``[..., N, K]``)."""

    quantized: AffineQuantized  # codes [..., N, K]; scale/zero [..., N, K/g] in qparam_dtype
    u: torch.Tensor  # float32 [..., N, R]; expert e uses its first ranks[e] columns, the rest are 0
    v: torch.Tensor  # float32 [..., R, K]; expert e uses its first ranks[e] rows, the rest are 0
    ranks: tuple[int, ...]  # one per expert (len 1 for a 2D weight)
    rel_error: tuple[float, ...]  # ‖W − deq(Q) − UV‖_F / ‖W‖_F per expert, of the kept iterate


# ---------------------------------------------------------------------- truncated SVD


def _oversample(rank: int) -> int:
    return max(_MIN_OVERSAMPLE, rank // 4)


def choose_svd(n: int, k: int, rank: int, method: str = "auto") -> str:
    """Resolve ``method`` ("auto", "exact", "lowrank") to "exact" or "lowrank" for an N × K matrix."""
    method = _SVD_ALIASES.get(method, method)
    if method not in SVD_METHODS:
        raise ValueError(f"unknown svd method {method!r}; choose one of {SVD_METHODS}")
    if method != "auto":
        return method
    inner = min(n, k)
    if inner <= EXACT_SVD_MAX_DIM or 4 * (rank + _oversample(rank)) > inner:
        return "exact"
    return "lowrank"


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="reduced").Q


def _randomized_svd(
    e: torch.Tensor,
    rank: int,
    warm_start: torch.Tensor | None,
    generator: torch.Generator | None,
    niter: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of each matrix of ``e`` [B, N, K] by subspace iteration."""
    n, k = e.shape[-2:]
    q = min(rank + _oversample(rank), n, k)
    start = torch.randn(*e.shape[:-2], k, q, generator=generator, device=e.device, dtype=e.dtype)
    if warm_start is not None and warm_start.shape[-2] > 0:
        m = min(warm_start.shape[-2], q)
        start[..., :m] = warm_start[..., :m, :].mT
    if niter is None:
        niter = _WARM_POWER_ITERS if warm_start is not None else _COLD_POWER_ITERS
    basis = _orth(start)
    for _ in range(niter):
        basis = _orth(e.mT @ _orth(e @ basis))
    left = _orth(e @ basis)  # [B, N, q]
    u_small, s, vh = torch.linalg.svd(left.mT @ e, full_matrices=False)  # Rayleigh–Ritz
    return (left @ u_small[..., :rank]), s[..., :rank], vh[..., :rank, :]


def truncated_svd(
    e: torch.Tensor,
    rank: int,
    method: str = "auto",
    *,
    warm_start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    niter: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` (U [..., N, r], S [..., r], Vh [..., r, K]) of each matrix of ``e``.

    ``warm_start`` ([..., ≥r, K], orthonormal-ish rows, e.g. a previous ``Vh``) seeds the
    randomized method; ignored by the exact one.
    """
    n, k = e.shape[-2:]
    if choose_svd(n, k, rank, method) == "exact":
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        return u[..., :rank], s[..., :rank], vh[..., :rank, :]
    return _randomized_svd(e, rank, warm_start, generator, niter)


def low_rank_factors(
    e: torch.Tensor, rank: int, method: str = "auto", **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [..., N, r], V [..., r, K]) with U V the best rank-r approximation of e, √S on each side
    (balanced factors: both have the same scale, which suits their later fp16/int8/int3 storage)."""
    u, s, vh = truncated_svd(e, rank, method, **kwargs)
    root = s.sqrt()
    return u * root.unsqueeze(-2), root.unsqueeze(-1) * vh


# ---------------------------------------------------------------------- validation


def _check_quantizer(name: str) -> str:
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; choose one of {QUANTIZERS}")
    return name


def _normalize_ranks(ranks: int | Sequence[int], shape: tuple[int, ...]) -> tuple[int, ...]:
    n, k = shape[-2:]
    n_experts = math.prod(shape[:-2])
    if isinstance(ranks, (int, torch.SymInt)) and not isinstance(ranks, bool):
        ranks = (int(ranks),) * n_experts
    elif isinstance(ranks, torch.Tensor):
        ranks = tuple(int(r) for r in ranks.flatten().tolist())
    else:
        try:
            ranks = tuple(ranks)
        except TypeError:
            raise ValueError(f"ranks must be an int or a sequence of ints, got {ranks!r}") from None
        if any(isinstance(r, bool) or not isinstance(r, int) for r in ranks):
            raise ValueError(f"ranks must be ints, got {ranks!r}")
    if len(ranks) != n_experts:
        raise ValueError(
            f"got {len(ranks)} ranks for a weight of shape {tuple(shape)} with {n_experts} expert(s); "
            f"pass one int for all or one rank per expert"
        )
    for e, r in enumerate(ranks):
        where = f" (expert {e})" if n_experts > 1 else ""
        if r < 0:
            raise ValueError(f"rank must be >= 0, got {r}{where}")
        if r > min(n, k):
            raise ValueError(
                f"rank {r}{where} exceeds min(N, K) = {min(n, k)} for a weight of shape {tuple(shape)} "
                f"(N={n}, K={k}); a rank-r compensator needs r <= min(N, K)"
            )
    return ranks


# ---------------------------------------------------------------------- the MiLo loop


def _quantize(name: str, w: torch.Tensor, bits: int, group_size: int, qparam_dtype) -> AffineQuantized:
    if name == "hqq":
        return quantize_hqq(w, bits, group_size, qparam_dtype=qparam_dtype)
    return quantize_rtn(w, bits, group_size, qparam_dtype=qparam_dtype)


def _pick(better: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per-expert select along dim 0 of [B, ...] tensors."""
    return torch.where(better.view(-1, *([1] * (new.ndim - 1))), new, old)


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
    """Compress W ([N, K], or [E, N, K] / any leading dims) into ``bits``-bit codes plus
    per-expert rank-r compensators U V, calibration-free.

    Args:
        ranks: one int for every expert, or one per expert (flattened leading dims); 0 allowed.
        iters: MiLo iterations T (each: one quantize, one SVD); 0 or 1 gives the one-shot
            quantize-then-fit. With all ranks 0 it is a single quantize.
        quantizer: "hqq" (half-quadratic zero solver) or "rtn" (min/max round-to-nearest).
        qparam_dtype: the dtype scale/zero are stored in (e.g. the model's bf16); the loop
            measures errors with the rounded values, so the kept iterate is best as stored.
        svd: "auto", "exact" or "lowrank" (see the module docstring).
        seed: seeds the randomized SVD, so results are reproducible.
    """
    check_bits(bits)
    check_weight(w, group_size)
    _check_quantizer(quantizer)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")
    shape = tuple(w.shape)
    rank_t = _normalize_ranks(ranks, shape)
    n, k = shape[-2:]
    r_max = max(rank_t)
    method = choose_svd(n, k, r_max, svd)

    weights = w.detach().to(torch.float32).reshape(-1, n, k)  # [B, N, K]
    b = weights.shape[0]
    norms = torch.linalg.vector_norm(weights, dim=(-2, -1)).clamp_min(torch.finfo(torch.float32).tiny)
    rank_vec = torch.tensor(rank_t, device=w.device)
    keep = (torch.arange(r_max, device=w.device) < rank_vec.unsqueeze(1)).to(torch.float32)  # [B, R]
    generator = torch.Generator(device=w.device).manual_seed(seed)

    u = weights.new_zeros(b, n, r_max)
    v = weights.new_zeros(b, r_max, k)
    warm: torch.Tensor | None = None
    best: AffineQuantized | None = None
    best_u, best_v = u, v
    best_err = torch.full((b,), float("inf"), device=w.device)
    steps = 1 if r_max == 0 else max(iters, 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"MiLo {tuple(shape)} r<={r_max}", leave=False)
    for step in range(steps):
        target = weights if step == 0 else torch.baddbmm(weights, u, v, alpha=-1.0)
        q = _quantize(quantizer, target, bits, group_size, qparam_dtype)
        del target
        resid = q.dequantize().neg_().add_(weights)  # E = W − deq(Q), in place
        if r_max > 0:
            left, s, vh = truncated_svd(resid, r_max, method, warm_start=warm, generator=generator)
            warm = vh
            root = s.sqrt() * keep  # rank masking: expert e keeps its top ranks[e] directions
            u = left * root.unsqueeze(-2)
            v = root.unsqueeze(-1) * vh
            resid = torch.baddbmm(resid, u, v, alpha=-1.0)
        err = torch.linalg.vector_norm(resid, dim=(-2, -1)) / norms
        del resid
        if best is None:
            best, best_u, best_v, best_err = q, u, v, err
        else:
            better = err < best_err
            best = AffineQuantized(
                _pick(better, q.codes, best.codes),
                _pick(better, q.scale, best.scale),
                _pick(better, q.zero, best.zero),
                group_size,
                bits,
            )
            best_u, best_v = _pick(better, u, best_u), _pick(better, v, best_v)
            best_err = torch.where(better, err, best_err)
        if bar is not None:
            bar.set_postfix_str(f"rel err {float(best_err.max()):.4f}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()

    lead = shape[:-2]
    quantized = AffineQuantized(
        best.codes.reshape(*lead, n, k),
        best.scale.reshape(*lead, n, k // group_size),
        best.zero.reshape(*lead, n, k // group_size),
        group_size,
        bits,
    )
    return MiLoResult(
        quantized=quantized,
        u=best_u.reshape(*lead, n, r_max),
        v=best_v.reshape(*lead, r_max, k),
        ranks=rank_t,
        rel_error=tuple(float(x) for x in best_err.tolist()),
    )


# ---------------------------------------------------------------------- compensator storage

COMPENSATOR_BITS = (3, 8)


def quantize_compensator(
    m: torch.Tensor, bits: int, group_size: int, qparam_dtype: torch.dtype | None = None
) -> AffineQuantized:
    """Round-to-nearest of each row of a compensator factor (Uᵀ [.., R, N] or V [.., R, K])
    along its length, in groups of ``group_size`` (the paper stores them int3, group 64).

    ``qparam_dtype``: the dtype the scales/zeros will be stored in; pass it so the codes are the
    nearest ones for the stored qparams.
    """
    if bits not in COMPENSATOR_BITS:
        raise ValueError(f"compensator bits must be one of {COMPENSATOR_BITS}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"compensator group_size must be a positive integer, got {group_size!r}")
    if m.ndim >= 1 and m.shape[-1] % group_size:
        raise ValueError(
            f"a compensator row of length {m.shape[-1]} (factor of shape {tuple(m.shape)}) is not a multiple "
            f"of the compensator group size {group_size}; pick a compensator_group_size that divides "
            f"{m.shape[-1]}, or keep the compensator in floating point (comp_bits=None)"
        )
    check_weight(m, group_size, name="compensator factor")
    return quantize_rtn(m, bits, group_size, qparam_dtype=qparam_dtype)
