"""Rank policies: how many compensator ranks each weight gets.

A policy is any callable ``(WeightInfo) -> int`` (a plain user function works). Built-ins that
need to see all experts of one stacked parameter at once (a rank budget shared by the experts)
also implement ``assign(infos) -> list[int]``; :func:`assign_ranks` uses it when present and
validates every result.

Ranks the user states outright (``ConstantRank``, ``DenseSparseRank``, a plain function) are used
as given: one larger than ``min(N, K)`` of some weight is a ValueError naming that weight, not a
silent clip. Policies that compute ranks (``KurtosisRank``, ``EnergyRank``) keep within each
weight's ``min(N, K)`` (and their ``max_rank``) themselves.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from milo_tensor.quant.affine import quantize_rtn
from milo_tensor.quant.hqq import quantize_hqq

__all__ = [
    "WeightInfo",
    "RankFn",
    "ConstantRank",
    "DenseSparseRank",
    "KurtosisRank",
    "EnergyRank",
    "POLICIES",
    "get_rank_policy",
    "assign_ranks",
    "kurtosis",
]

KINDS = ("dense", "expert")


@dataclass(frozen=True, eq=False)
class WeightInfo:
    """What a rank policy sees about one 2D weight (one expert of a stack, or a Linear weight)."""

    fqn: str  # fully-qualified parameter name, e.g. "model.layers.0.mlp.experts.gate_up_proj"
    kind: str  # "dense" (attention, shared experts, dense MLP) or "expert" (routed)
    expert: int | None  # expert index for expert weights, else None
    shape: tuple[int, int]  # (N, K) of this 2D weight
    weight: torch.Tensor = field(repr=False)  # the 2D float weight


RankFn = Callable[[WeightInfo], int]


def _check_rank_arg(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


@dataclass(frozen=True)
class ConstantRank:
    """The same rank for every weight."""

    rank: int

    def __post_init__(self) -> None:
        _check_rank_arg("rank", self.rank)

    def __call__(self, info: WeightInfo) -> int:
        return self.rank


@dataclass(frozen=True)
class DenseSparseRank:
    """The paper's split: ``dense_rank`` for weights every token uses (attention, shared experts,
    dense MLPs: kind "dense"), ``sparse_rank`` for routed experts (kind "expert"), which are many
    and each read by few tokens, so a small rank buys most of the accuracy for little memory."""

    dense_rank: int = 64
    sparse_rank: int = 16

    def __post_init__(self) -> None:
        _check_rank_arg("dense_rank", self.dense_rank)
        _check_rank_arg("sparse_rank", self.sparse_rank)

    def __call__(self, info: WeightInfo) -> int:
        return self.dense_rank if info.kind == "dense" else self.sparse_rank


# ---------------------------------------------------------------------- kurtosis


def kurtosis(w: torch.Tensor) -> float:
    """Excess (Fisher) kurtosis E[(x − μ)⁴] / σ⁴ − 3 of all entries: 0 for a Gaussian, large for
    heavy tails (the MiLo paper's thresholds, "0 ranks below 1", are on this scale). 0 for a
    constant weight."""
    x = w.detach().to(torch.float32).flatten()
    var, mean = torch.var_mean(x, correction=0)
    if not float(var) > 0:
        return 0.0
    z = (x - mean) / var.sqrt()
    return float(z.square().square().mean()) - 3.0


def _budget_split(scores: list[float], budget: int, lo: int, hi: int, step: int) -> list[int]:
    """Integer ranks ∝ scores, each in [lo, hi], multiples of ``step`` where possible, summing to
    at most ``budget``, monotone in the score (a higher score never gets a smaller rank).

    Water-filling: find λ with Σ clamp(λ·score, lo, hi) = budget (bisection), floor each share to
    a multiple of ``step`` (never below ``lo``), then hand the leftover out ``step`` at a time to
    the largest shortfalls (ties to the higher score)."""
    n = len(scores)
    if n * lo > budget:
        lo = budget // n
    if n * hi <= budget:
        return [hi] * n

    def total(lam: float) -> float:
        return sum(min(max(lam * s, lo), hi) for s in scores)

    a, b = 0.0, 1.0
    while total(b) < budget and b < 1e300:
        b *= 2.0
    for _ in range(200):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if total(mid) < budget else (a, mid)
    shares = [min(max(a * s, lo), hi) for s in scores]

    def floor_step(x: float) -> int:
        r = int(math.floor(x / step)) * step
        return r if r >= lo else min(int(math.floor(x)), hi)

    ranks = [max(lo, floor_step(x)) for x in shares]
    left = budget - sum(ranks)
    order = sorted(range(n), key=lambda i: (shares[i] - ranks[i], scores[i]), reverse=True)
    changed = True
    while left > 0 and changed:
        changed = False
        for i in order:
            inc = min(step - ranks[i] % step, hi - ranks[i])  # up to the next multiple of step
            if 0 < inc <= left:
                ranks[i] += inc
                left -= inc
                changed = True
    return ranks


@dataclass(frozen=True)
class KurtosisRank:
    """Routed experts' ranks follow their kurtosis, within a budget; dense weights get ``dense_rank``.

    Heavier-tailed weights lose more to 3-bit rounding, so they get more rank. The MiLo paper's
    Mixtral policy gives an expert 2^(round(kurtosis) + k) ranks; here the experts of one stacked
    parameter share ``mean_rank × n_experts`` ranks in proportion to 2^round(kurtosis) (exponent
    clipped to [0, 10], the paper's 1024 cap), clamped to [min_rank, max_rank], rounded to
    multiples of 8 where possible, and never over the budget. A lone expert weight (experts as
    separate Linear modules, seen one at a time) uses the paper's absolute rule,
    ``mean_rank / 4 · 2^round(kurtosis)`` (k = log2(mean_rank / 4): k = 3 for a mean of 32),
    and 0 below kurtosis 1.
    """

    mean_rank: int = 32
    min_rank: int = 0
    max_rank: int | None = None
    dense_rank: int = 64

    def __post_init__(self) -> None:
        _check_rank_arg("mean_rank", self.mean_rank)
        _check_rank_arg("min_rank", self.min_rank)
        _check_rank_arg("max_rank", self.max_rank, allow_none=True)
        _check_rank_arg("dense_rank", self.dense_rank)
        if self.min_rank > self.mean_rank:
            raise ValueError(f"min_rank ({self.min_rank}) must be <= mean_rank ({self.mean_rank})")
        if self.max_rank is not None and self.max_rank < self.min_rank:
            raise ValueError(f"max_rank ({self.max_rank}) must be >= min_rank ({self.min_rank})")

    def _cap(self, info: WeightInfo) -> int:
        cap = min(info.shape)
        return cap if self.max_rank is None else min(cap, self.max_rank)

    def __call__(self, info: WeightInfo) -> int:
        if info.kind == "dense":
            return self.dense_rank
        kurt = kurtosis(info.weight)
        raw = 0 if kurt < 1.0 else self.mean_rank / 4 * 2.0 ** min(round(kurt), 10)
        return max(min(self.min_rank, self._cap(info)), min(int(raw), self._cap(info)))

    def assign(self, infos: Sequence[WeightInfo]) -> list[int]:
        ranks: list[int | None] = [None] * len(infos)
        stacks: dict[str, list[int]] = defaultdict(list)
        for i, info in enumerate(infos):
            if info.kind == "expert":
                stacks[info.fqn].append(i)
            else:
                ranks[i] = self(info)
        for members in stacks.values():
            if len(members) == 1:
                ranks[members[0]] = self(infos[members[0]])
                continue
            scores = [2.0 ** min(max(round(kurtosis(infos[i].weight)), 0), 10) for i in members]
            cap = min(self._cap(infos[i]) for i in members)
            step = 8 if self.mean_rank >= 8 else 1
            split = _budget_split(scores, self.mean_rank * len(members), min(self.min_rank, cap), cap, step)
            for i, r in zip(members, split):
                ranks[i] = r
        return [int(r) for r in ranks]


# ---------------------------------------------------------------------- energy


@dataclass(frozen=True)
class EnergyRank:
    """Smallest r whose top-r singular values keep ``fraction`` of the spectral energy (‖·‖_F²)
    of the quantization residual W − deq(quantize(W)), capped at ``max_rank``.

    Spends rank where the quantizer leaves structured (low-rank) error and none where the error
    is noise-like. Only the top ``max_rank`` singular values are needed (the total energy is
    ‖R‖_F²), so large weights use the randomized truncated SVD.
    """

    fraction: float = 0.5
    max_rank: int = 256
    quantizer: str = "rtn"
    bits: int = 3
    group_size: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.fraction) <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        _check_rank_arg("max_rank", self.max_rank)
        if self.quantizer not in ("rtn", "hqq"):
            raise ValueError(f"unknown quantizer {self.quantizer!r}; choose 'rtn' or 'hqq'")

    def _ranks(self, w: torch.Tensor) -> list[int]:
        """Ranks of a batch of same-shape weights [B, N, K]."""
        from milo_tensor.quant.compensator import truncated_svd  # compensator imports nothing from here

        w = w.detach().to(torch.float32)
        quant = quantize_rtn if self.quantizer == "rtn" else quantize_hqq
        resid = w - quant(w, self.bits, self.group_size).dequantize()
        cap = min(self.max_rank, *w.shape[-2:])
        if self.fraction == 0.0 or cap == 0:
            return [0] * w.shape[0]
        total = resid.square().sum(dim=(-2, -1))
        _, s, _ = truncated_svd(resid, cap)
        kept = torch.cumsum(s.square(), dim=-1) / total.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
        # smallest r with kept[r-1] >= fraction (tolerance for float32 sums hitting 1.0), else cap
        reached = kept >= float(self.fraction) * (1.0 - 1e-6)
        first = torch.where(reached.any(-1), reached.float().argmax(-1) + 1, torch.full_like(total, cap).long())
        return [int(r) for r in first.tolist()]

    def __call__(self, info: WeightInfo) -> int:
        return self._ranks(info.weight.unsqueeze(0))[0]

    def assign(self, infos: Sequence[WeightInfo]) -> list[int]:
        ranks: list[int] = [0] * len(infos)
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i, info in enumerate(infos):
            by_shape[(tuple(info.weight.shape), info.weight.device)].append(i)
        for members in by_shape.values():  # one batched quantize + SVD per stack
            out = self._ranks(torch.stack([infos[i].weight for i in members]))
            for i, r in zip(members, out):
                ranks[i] = r
        return ranks


# ---------------------------------------------------------------------- lookup and validation

POLICIES: dict[str, type] = {
    "constant": ConstantRank,
    "dense_sparse": DenseSparseRank,
    "kurtosis": KurtosisRank,
    "energy": EnergyRank,
}


def get_rank_policy(name_or_callable: object, **kwargs) -> RankFn:
    """A rank policy from a name in ``POLICIES`` (built with ``kwargs``), an int (constant rank),
    or a policy / callable ``(WeightInfo) -> int`` (returned as is)."""
    policy = name_or_callable
    if isinstance(policy, bool):
        raise ValueError(f"a rank policy cannot be a bool, got {policy!r}")
    if isinstance(policy, int):
        if kwargs:
            raise ValueError(f"an int rank policy takes no options, got {sorted(kwargs)}")
        return ConstantRank(policy)
    if isinstance(policy, str):
        key = policy.strip().lower().replace("-", "_")
        if key not in POLICIES:
            raise ValueError(f"unknown rank policy {policy!r}; valid names: {', '.join(sorted(POLICIES))}")
        try:
            return POLICIES[key](**kwargs)
        except TypeError as err:
            raise ValueError(f"bad options for rank policy {policy!r}: {err}") from None
    if callable(policy):
        if kwargs:
            raise ValueError(f"options {sorted(kwargs)} only apply to a policy given by name")
        return policy
    raise ValueError(
        f"rank_fn must be a policy name ({', '.join(sorted(POLICIES))}), an int, or a callable "
        f"(WeightInfo) -> int; got {policy!r}"
    )


def assign_ranks(policy: RankFn, infos: Sequence[WeightInfo]) -> list[int]:
    """Ranks for ``infos`` (typically all experts of one parameter): ``policy.assign`` if it has
    one, else ``policy(info)`` per weight; each must be an int in [0, min(N, K)]."""
    infos = list(infos)
    assign = getattr(policy, "assign", None)
    ranks = list(assign(infos)) if callable(assign) else [policy(info) for info in infos]
    if len(ranks) != len(infos):
        raise ValueError(f"rank policy {policy!r} returned {len(ranks)} ranks for {len(infos)} weights")
    out = []
    for info, r in zip(infos, ranks):
        where = info.fqn + (f" (expert {info.expert})" if info.expert is not None else "")
        if isinstance(r, bool):
            raise ValueError(f"rank policy returned {r!r} for {where}; it must return an int")
        try:
            r = operator.index(r)
        except TypeError:
            raise ValueError(f"rank policy returned {r!r} for {where}; it must return an int") from None
        limit = min(info.shape)
        if not 0 <= r <= limit:
            raise ValueError(
                f"rank {r} for {where} is outside [0, min(N, K) = {limit}] for its shape {tuple(info.shape)}"
            )
        out.append(r)
    return out
