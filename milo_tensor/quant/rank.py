"""Rank policies: how many compensator ranks each weight gets.

A policy is any callable ``(WeightInfo) -> int``; built-ins that need to see all experts of one
stacked parameter at once (a budget shared by the experts) also implement ``assign(infos)``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from milo_tensor.quant.affine import quantize_rtn


@dataclass(frozen=True)
class WeightInfo:
    fqn: str  # fully-qualified parameter name
    kind: str  # "dense" (attention, shared experts, dense MLP) or "expert" (routed)
    expert: int | None  # expert index for expert weights
    shape: tuple[int, int]  # (N, K) of this 2D weight
    weight: torch.Tensor = field(repr=False, compare=False)


RankFn = Callable[[WeightInfo], int]


@dataclass(frozen=True)
class ConstantRank:
    rank: int

    def __call__(self, info: WeightInfo) -> int:
        return self.rank


@dataclass(frozen=True)
class DenseSparseRank:
    """The paper's split: large rank for dense weights, small rank for routed experts."""

    dense_rank: int = 64
    sparse_rank: int = 16

    def __call__(self, info: WeightInfo) -> int:
        return self.dense_rank if info.kind == "dense" else self.sparse_rank


def kurtosis(w: torch.Tensor) -> float:
    """Pearson kurtosis E[(x − μ)⁴] / σ⁴ (3 for a Gaussian)."""
    x = w.detach().double().flatten()
    x = x - x.mean()
    var = x.pow(2).mean()
    return float(x.pow(4).mean() / var.pow(2)) if var > 0 else 0.0


@dataclass(frozen=True)
class KurtosisRank:
    """Routed experts share ``mean_rank × n_experts`` ranks in proportion to 2^round(kurtosis).

    Heavier-tailed experts lose more to 3-bit rounding, so they get more rank (the MiLo paper's
    kurtosis policy), while the stack's total never exceeds the budget. Ranks are multiples of 8
    where the budget allows. Dense weights get ``dense_rank``.
    """

    mean_rank: int = 16
    min_rank: int = 0
    max_rank: int | None = None
    dense_rank: int = 64

    def __call__(self, info: WeightInfo) -> int:
        return self.dense_rank if info.kind == "dense" else self.mean_rank

    def assign(self, infos: Sequence[WeightInfo]) -> list[int]:
        experts = [i for i, info in enumerate(infos) if info.kind == "expert"]
        ranks = [self(info) for info in infos]
        if not experts:
            return ranks
        scores = torch.tensor([2.0 ** round(min(max(kurtosis(infos[i].weight), 0.0), 30.0)) for i in experts])
        budget = self.mean_rank * len(experts)
        step = 8 if self.mean_rank >= 8 else 1
        cap = min(min(infos[i].shape) for i in experts)
        cap = cap if self.max_rank is None else min(cap, self.max_rank)
        raw = scores / scores.sum() * budget
        alloc = [min(cap, max(self.min_rank, int(x // step) * step)) for x in raw.tolist()]
        # Hand the leftover budget out in steps, largest shortfall first.
        order = sorted(range(len(alloc)), key=lambda j: float(raw[j]) - alloc[j], reverse=True)
        for j in order:
            if sum(alloc) + step <= budget and alloc[j] + step <= cap:
                alloc[j] += step
        for i, r in zip(experts, alloc):
            ranks[i] = r
        return ranks


@dataclass(frozen=True)
class EnergyRank:
    """Smallest r keeping ``fraction`` of the spectral energy of the 3-bit residual W − deq(Q)."""

    fraction: float = 0.5
    max_rank: int = 256
    bits: int = 3
    group_size: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")

    def __call__(self, info: WeightInfo) -> int:
        w = info.weight.detach().float()
        residual = w - quantize_rtn(w, self.bits, self.group_size).dequantize()
        energy = torch.linalg.svdvals(residual).pow(2)
        kept = torch.cumsum(energy, 0) / energy.sum().clamp_min(1e-30)
        r = int((kept < self.fraction - 1e-12).sum()) + (1 if self.fraction > 0 else 0)
        return min(r, self.max_rank, min(info.shape))


POLICIES = {"constant": ConstantRank, "dense_sparse": DenseSparseRank, "kurtosis": KurtosisRank, "energy": EnergyRank}


def get_rank_policy(policy: object, **kwargs) -> RankFn:
    """A policy from an instance, a callable, an int (constant rank) or a name in POLICIES."""
    if isinstance(policy, bool):
        raise ValueError(f"a rank policy cannot be a bool, got {policy!r}")
    if isinstance(policy, int):
        return ConstantRank(policy)
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"unknown rank policy {policy!r}; valid names: {sorted(POLICIES)}")
        return POLICIES[policy](**kwargs)
    if callable(policy):
        return policy
    raise ValueError(f"rank_fn must be a rank policy, a callable (WeightInfo) -> int, an int or a name, got {policy!r}")


def assign_ranks(policy: RankFn, infos: Sequence[WeightInfo]) -> list[int]:
    """Ranks for the weights of one parameter (all experts of a stack), validated."""
    ranks = policy.assign(infos) if hasattr(policy, "assign") else [policy(info) for info in infos]
    out = []
    for info, r in zip(infos, ranks):
        try:
            r = operator.index(r)
        except TypeError:
            raise ValueError(f"rank policy returned {r!r} for {info.fqn}; it must return an int") from None
        where = info.fqn + (f" (expert {info.expert})" if info.expert is not None else "")
        if not 0 <= r <= min(info.shape):
            raise ValueError(
                f"rank {r} for {where} is outside [0, min(N, K) = {min(info.shape)}] for its shape {info.shape}"
            )
        out.append(r)
    return out
