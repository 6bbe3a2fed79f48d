"""Random weights for the algorithm tests, drawn entirely from the caller's generator."""

import torch


def student_t(shape, gen, df=3, scale=0.02):
    """Heavy-tailed weights like real LLM weights (Student-t with df degrees of freedom), never zeros."""
    z = torch.randn(shape, generator=gen)
    chi2 = sum(torch.randn(shape, generator=gen).square() for _ in range(df))
    return z / (chi2 / df).sqrt() * scale


def rel(a, b):
    """Relative Frobenius error of a against b."""
    return float((a - b).norm() / b.norm())
