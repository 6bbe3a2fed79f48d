"""HQQ's half-quadratic solver for the zero point of affine group quantization.

Calibration-free (Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models").
With the scale fixed at its min/max value, HQQ minimizes an lp-norm (p < 1) of the weight error
W − (Q − z)·s over the zero point z by splitting it with an auxiliary error variable W_e:

    W_e ← shrink_p(W − (Q − z)·s, β)       generalized soft threshold: the lp proximal step
    z   ← mean_g(Q − (W − W_e) / s)        closed form, per group
    Q   ← round(W / s + z) clamped         nearest codes for the new z
    β   ← κ·β

p < 1 lets the few outliers of heavy-tailed weights keep their error instead of dragging the
zero point of the whole group toward them.

What differs from the reference package (hqq 0.2.8, ``optimize_weights_proximal_legacy``):
- all arithmetic is done in the *scaled* domain (``y = W/s + z``, error ``y − Q``), which saves
  two full passes per step; the algebra is identical;
- each group keeps its own best zero by the squared error (what the layer output and the MiLo
  loop measure), instead of the last one of the whole tensor; the loop stops early, as HQQ
  does, once the whole tensor's error stops falling;
- it runs batched over any leading dims (an [E, N, K] expert stack in one call), in float32 on
  the input's device.
"""

from __future__ import annotations

import torch

from milo_tensor.quant.affine import (
    AffineQuantized,
    check_bits,
    check_weight,
    group_view,
    minmax_qparams,
    pack_result,
)

__all__ = ["quantize_hqq"]


def _check_params(lp_norm: float, beta: float, kappa: float, iters: int) -> None:
    if not 0.0 < lp_norm <= 1.0:
        raise ValueError(f"lp_norm must be in (0, 1], got {lp_norm}")
    if not beta > 0.0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not kappa >= 1.0:
        raise ValueError(f"kappa must be >= 1 (beta grows each step), got {kappa}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")


def quantize_hqq(
    w: torch.Tensor,
    bits: int = 3,
    group_size: int = 64,
    *,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    early_stop: bool = True,
    qparam_dtype: torch.dtype | None = None,
) -> AffineQuantized:
    """Affine group quantization of ``w`` ([..., N, K]) with HQQ-optimized zero points.

    ``iters`` zero-point updates at most (0 gives plain min/max RTN). The returned scale/zero are
    rounded to ``qparam_dtype`` (if given) and the codes recomputed from the rounded values.
    """
    check_bits(bits)
    check_weight(w, group_size)
    _check_params(lp_norm, beta, kappa, iters)
    maxq = 2**bits - 1
    wg = group_view(w, group_size)  # [..., N, G, g] float32
    scale, zero = minmax_qparams(wg, bits, qparam_dtype)  # [..., N, G, 1]
    if iters == 0 or wg.numel() == 0:
        return pack_result(wg, scale, zero, bits, group_size, qparam_dtype)

    inv = scale.reciprocal()
    scale_sq = scale.square()
    # The lp threshold (1/β)|D|^(p−1) in weight units, carried into the scaled domain
    # (D = d/inv): inv·(1/β)·|d/inv|^(p−1) = (inv^(2−p) / β)·|d|^(p−1).
    inv_pow = inv.pow(2.0 - lp_norm)

    z = zero
    best_z = zero
    best_err = torch.full_like(zero, float("inf"))
    prev_total = float("inf")
    for step in range(iters + 1):
        y = torch.addcmul(z, wg, inv)  # W / s + z
        q = torch.round(y).clamp_(0, maxq)
        d = y.sub_(q)  # scaled error: (W − (Q − z)·s) / s
        err = d.square().sum(dim=-1, keepdim=True)  # per group, in scaled units
        better = err < best_err
        best_z = torch.where(better, z, best_z)
        best_err = torch.where(better, err, best_err)
        if step == iters:
            break
        if early_stop:
            total = float((err * scale_sq).sum())
            if total >= prev_total:
                break
            prev_total = total
        # W_e / s = sign(d)·relu(|d| − c|d|^(p−1)); |d|^(p−1) is inf at d = 0, which relu maps to 0.
        shrunk = d.abs()
        thresh = shrunk.pow(lp_norm - 1.0).mul_(inv_pow / beta)
        shrunk.sub_(thresh).clamp_min_(0.0).copysign_(d)
        del thresh
        # z ← mean(Q − (W − W_e)/s) = z + mean(W_e/s − d)
        z = z + shrunk.sub_(d).mean(dim=-1, keepdim=True)
        del shrunk, y, q, d
        beta *= kappa
    return pack_result(wg, scale, best_z, bits, group_size, qparam_dtype)
