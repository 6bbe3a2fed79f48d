"""Asymmetric affine group quantization: the number convention every other module shares.

    W ≈ (Q − zero) · scale        Q integer in [0, 2**bits − 1]

with one (scale, zero) pair per group of ``group_size`` consecutive elements along the LAST
dimension, any leading batch dims ([N, K], [E, N, K], ...). ``zero`` is real-valued (HQQ style),
not rounded to an integer, so a solver may place it anywhere.

Everything here computes in float32 whatever the input dtype, and runs on the input's device.
This module holds only the convention and the plain round-to-nearest (RTN) quantizer; the HQQ
solver (``hqq.py``) and the MiLo loop (``compensator.py``) build on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "AffineQuantized",
    "check_weight",
    "check_bits",
    "quantize_rtn",
    "quantize_codes",
    "dequantize_affine",
    "finalize_qparams",
    "group_view",
]

MIN_BITS, MAX_BITS = 2, 8

# The largest |zero| we let a degenerate (near-constant) group produce: keeps fp16/bf16 qparams
# finite. A group with range r and magnitude m gets scale >= m / _MAX_ZERO_MAGNITUDE.
_MAX_ZERO_MAGNITUDE = 1.0e4


@dataclass
class AffineQuantized:
    """Codes and per-group qparams of one (possibly batched) weight.

    ``codes`` is uint8 ``[..., N, K]``; ``scale`` and ``zero`` are ``[..., N, K // group_size]``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    bits: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(Q − zero) · scale, computed in float32 and returned in ``dtype``."""
        return dequantize_affine(self.codes, self.scale, self.zero, self.group_size, dtype)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


# ---------------------------------------------------------------------- validation


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def check_weight(w: torch.Tensor, group_size: int, name: str = "weight") -> None:
    """Raise a ValueError that names the problem and the fix if ``w`` cannot be group-quantized.

    Checked: a tensor at all, a floating dtype, at least 2 dims, a positive ``group_size`` that
    divides the last dim, and only finite values (a NaN or Inf would silently poison a whole group's
    scale).
    """
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise ValueError(
            f"{name} has dtype {w.dtype}; quantization needs a floating-point weight "
            f"(convert it with .float() or .to(torch.bfloat16) first)"
        )
    if w.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dims ([N, K] or [E, N, K]), got shape {tuple(w.shape)}; "
            f"reshape a vector to [1, K] if you really mean one row"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    k = w.shape[-1]
    if k % group_size != 0:
        raise ValueError(
            f"{name} of shape {tuple(w.shape)}: its last dim K={k} is not a multiple of "
            f"group_size={group_size}; pick a group size that divides {k} (e.g. 32, 64 or 128) "
            f"or pad the input dimension"
        )
    if w.numel() and not bool(torch.isfinite(w).all()):
        n_nan = int(torch.isnan(w).sum())
        n_inf = int(torch.isinf(w).sum())
        raise ValueError(
            f"{name} of shape {tuple(w.shape)} contains {n_nan} NaN and {n_inf} Inf values; "
            f"quantization needs finite weights: fix the checkpoint or the overflow that produced them"
        )


# ---------------------------------------------------------------------- helpers


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[..., K]`` -> ``[..., K // group_size, group_size]`` float32 (a view when possible)."""
    w = w.to(torch.float32)
    return w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def _scale_floor(dtype: torch.dtype) -> float:
    """Smallest scale we store: a normal number of the qparam dtype (never 0, never subnormal)."""
    return float(torch.finfo(dtype).tiny)


def minmax_qparams(
    wg: torch.Tensor, bits: int, qparam_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max (scale, zero) of grouped float32 weights ``[..., G, g]`` -> ``[..., G, 1]`` each.

    A constant group (range 0) gets a scale from its magnitude instead, so that it is encoded
    exactly by code 0 with no division by zero; a near-constant group far from 0 gets its scale
    raised until |zero| <= 1e4, so fp16/bf16 qparams stay finite.
    """
    maxq = 2**bits - 1
    lo = wg.amin(dim=-1, keepdim=True)
    hi = wg.amax(dim=-1, keepdim=True)
    mag = torch.maximum(lo.abs(), hi.abs())
    rng = hi - lo
    denom = torch.where(rng > 0, rng, mag)
    floor = _scale_floor(qparam_dtype or torch.float32)
    scale = torch.maximum(denom / maxq, mag / _MAX_ZERO_MAGNITUDE).clamp_min(floor)
    zero = -lo / scale
    return scale, zero


def finalize_qparams(
    scale: torch.Tensor, zero: torch.Tensor, qparam_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round scale/zero to the storage dtype (then back to float32 for the code computation)."""
    if qparam_dtype is None:
        return scale, zero
    if not qparam_dtype.is_floating_point:
        raise ValueError(f"qparam_dtype must be a floating dtype, got {qparam_dtype}")
    floor = _scale_floor(qparam_dtype)
    # the largest value both the storage dtype and the float32 math hold (a float64 model's bound is float32's)
    big = min(float(torch.finfo(qparam_dtype).max), float(torch.finfo(torch.float32).max))
    scale = scale.clamp(floor, big).to(qparam_dtype).to(torch.float32)
    zero = zero.clamp(-big, big).to(qparam_dtype).to(torch.float32)
    return scale, zero


def _codes_grouped(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    maxq = 2**bits - 1
    return torch.round(wg / scale + zero).clamp_(0, maxq)


def _ungroup(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def pack_result(
    wg: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    qparam_dtype: torch.dtype | None,
) -> AffineQuantized:
    """Round qparams to ``qparam_dtype``, RE-compute the codes from the rounded qparams (so the
    stored codes are the nearest ones for the stored qparams) and assemble the result."""
    scale, zero = finalize_qparams(scale, zero, qparam_dtype)
    codes = _codes_grouped(wg, scale, zero, bits).to(torch.uint8)
    out_dtype = qparam_dtype or torch.float32
    return AffineQuantized(
        codes=_ungroup(codes),
        scale=scale.squeeze(-1).to(out_dtype),
        zero=zero.squeeze(-1).to(out_dtype),
        group_size=group_size,
        bits=bits,
    )


# ---------------------------------------------------------------------- public API


def quantize_rtn(
    w: torch.Tensor, bits: int = 3, group_size: int = 64, qparam_dtype: torch.dtype | None = None
) -> AffineQuantized:
    """Plain min/max round-to-nearest: scale = (max − min) / (2**bits − 1), zero = −min / scale.

    The baseline every smarter quantizer must beat; also the compensator quantizer.
    """
    check_bits(bits)
    check_weight(w, group_size)
    wg = group_view(w, group_size)
    scale, zero = minmax_qparams(wg, bits, qparam_dtype)
    return pack_result(wg, scale, zero, bits, group_size, qparam_dtype)


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """uint8 codes round(w / scale + zero) clamped to [0, 2**bits − 1], for given qparams
    ``[..., N, K // group_size]`` (the nearest codes for those qparams)."""
    check_bits(bits)
    check_weight(w, group_size)
    wg = group_view(w, group_size)
    s = scale.to(torch.float32).unsqueeze(-1)
    z = zero.to(torch.float32).unsqueeze(-1)
    return _ungroup(_codes_grouped(wg, s, z, bits).to(torch.uint8))


def dequantize_affine(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(codes − zero) · scale per group along the last dim, in float32, returned as ``dtype``."""
    k = codes.shape[-1]
    if group_size <= 0 or k % group_size != 0:
        raise ValueError(f"codes of shape {tuple(codes.shape)}: last dim is not a multiple of group_size={group_size}")
    if scale.shape[-1] * group_size != k or zero.shape != scale.shape:
        raise ValueError(
            f"qparams of shape {tuple(scale.shape)} / {tuple(zero.shape)} do not match codes of shape "
            f"{tuple(codes.shape)} with group_size={group_size}"
        )
    cg = codes.to(torch.float32).reshape(*codes.shape[:-1], k // group_size, group_size)
    s = scale.to(torch.float32).unsqueeze(-1)
    z = zero.to(torch.float32).unsqueeze(-1)
    return _ungroup((cg - z) * s).to(dtype)
