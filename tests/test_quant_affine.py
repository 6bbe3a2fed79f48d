"""The affine group-quantization convention: W ≈ (Q − zero) · scale per group along the last dim."""

import pytest
import torch

from milo_tensor.quant.affine import (
    AffineQuantized,
    check_weight,
    dequantize_affine,
    quantize_codes,
    quantize_rtn,
)
from weights import student_t


pytestmark = pytest.mark.usefixtures("one_thread")


def groups(x, g):
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_rtn_codes_shapes_and_error_bound(gen, bits, group_size):
    w = student_t((128, 256), gen)
    q = quantize_rtn(w, bits, group_size)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    assert q.scale.shape == q.zero.shape == (128, 256 // group_size)
    assert q.scale.dtype == q.zero.dtype == torch.float32
    assert int(q.codes.min()) == 0 and int(q.codes.max()) == 2**bits - 1
    # min/max RTN: each group's min maps to code 0 and its max to the top code ...
    cg = groups(q.codes, group_size)
    assert (cg.amin(-1) == 0).all() and (cg.amax(-1) == 2**bits - 1).all()
    # ... and every element is within half a step of its reconstruction
    err = groups((q.dequantize() - w).abs(), group_size)
    assert (err <= q.scale.unsqueeze(-1) * (0.5 + 1e-4)).all()


def test_dequantize_matches_formula_elementwise(gen):
    w = student_t((4, 64), gen)
    q = quantize_rtn(w, 3, 32)
    deq = q.dequantize()
    for n in range(4):
        for k in range(64):
            expect = (float(q.codes[n, k]) - float(q.zero[n, k // 32])) * float(q.scale[n, k // 32])
            assert abs(float(deq[n, k]) - expect) < 1e-7
    assert torch.equal(dequantize_affine(q.codes, q.scale, q.zero, 32), deq)
    assert dequantize_affine(q.codes, q.scale, q.zero, 32, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_quantize_codes_round_trip(gen):
    w = student_t((64, 256), gen)
    q = quantize_rtn(w, 3, 64)
    assert torch.equal(quantize_codes(w, q.scale, q.zero, 3, 64), q.codes)
    # quantizing the dequantized weight again reproduces the codes exactly
    assert torch.equal(quantize_codes(q.dequantize(), q.scale, q.zero, 3, 64), q.codes)


@pytest.mark.parametrize("qdtype", [torch.float16, torch.bfloat16])
def test_qparam_dtype_rounds_then_recomputes_codes(gen, qdtype):
    w = student_t((128, 256), gen)
    q = quantize_rtn(w, 3, 64, qparam_dtype=qdtype)
    assert q.scale.dtype == q.zero.dtype == qdtype
    exact = quantize_rtn(w, 3, 64)
    assert torch.equal(q.scale, exact.scale.to(qdtype)) and torch.equal(q.zero, exact.zero.to(qdtype))
    # the stored codes are the nearest ones for the *stored* qparams ...
    assert torch.equal(q.codes, quantize_codes(w, q.scale, q.zero, 3, 64))
    # ... which is not what the float32 qparams give (so the recomputation matters)
    if qdtype == torch.bfloat16:
        assert not torch.equal(q.codes, exact.codes)
    # nearest: no neighbouring code (within range) reconstructs better
    s, z = q.scale.float().repeat_interleave(64, -1), q.zero.float().repeat_interleave(64, -1)
    c = q.codes.float()
    here = ((c - z) * s - w).abs()
    for delta in (-1.0, 1.0):
        other = c + delta
        ok = (other >= 0) & (other <= 7)
        assert (here[ok] <= ((other - z) * s - w).abs()[ok] + 1e-7).all()


@pytest.mark.parametrize("qdtype", [None, torch.float16, torch.bfloat16])
def test_constant_and_degenerate_groups_no_nan(gen, qdtype):
    w = student_t((4, 256), gen)
    w[0, :64] = 0.0
    w[1, 64:128] = 0.37
    w[2, 128:192] = -1.25
    w[3, 192:] = 1.0 + torch.arange(64) * 1e-9  # near-constant, far from zero
    q = quantize_rtn(w, 3, 64, qparam_dtype=qdtype)
    for t in (q.scale, q.zero, q.dequantize()):
        assert torch.isfinite(t.float()).all()
    assert (q.scale.float() > 0).all()
    deq = q.dequantize()
    tol = 1e-6 if qdtype is None else 1e-2
    assert torch.allclose(deq[0, :64], w[0, :64], atol=tol)
    assert torch.allclose(deq[1, 64:128], w[1, 64:128], rtol=tol, atol=0)
    assert torch.allclose(deq[2, 128:192], w[2, 128:192], rtol=tol, atol=0)
    assert torch.allclose(deq[3, 192:], w[3, 192:], rtol=tol, atol=0)


def test_batched_equals_per_matrix(gen):
    w = student_t((3, 64, 128), gen)
    q = quantize_rtn(w, 3, 64, qparam_dtype=torch.bfloat16)
    for e in range(3):
        qe = quantize_rtn(w[e], 3, 64, qparam_dtype=torch.bfloat16)
        assert torch.equal(q.codes[e], qe.codes) and torch.equal(q.scale[e], qe.scale)
    assert isinstance(q, AffineQuantized) and q.dequantize().shape == w.shape


def test_bf16_input_computes_in_float32(gen):
    w = student_t((64, 128), gen).to(torch.bfloat16)
    q = quantize_rtn(w, 3, 64)
    ref = quantize_rtn(w.float(), 3, 64)
    assert torch.equal(q.codes, ref.codes) and q.scale.dtype == torch.float32


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda g: torch.randint(0, 5, (8, 64), generator=g), "floating-point"),
        (lambda g: torch.ones(8, 64, dtype=torch.bool), "floating-point"),
        (lambda g: torch.randn(64, generator=g), "at least 2 dims"),
        (lambda g: torch.randn(8, 96, generator=g), "not a multiple of group_size=64"),
        (lambda g: torch.randn(8, 64, generator=g).index_fill_(1, torch.tensor([3]), float("nan")), "8 NaN"),
        (lambda g: torch.randn(8, 64, generator=g).index_fill_(0, torch.tensor([1]), float("inf")), "64 Inf"),
    ],
)
def test_check_weight_messages(gen, make, match):
    w = make(gen)
    with pytest.raises(ValueError, match=match):
        check_weight(w, 64)
    with pytest.raises(ValueError, match=match):
        quantize_rtn(w, 3, 64)


def test_check_weight_names_fix_and_bits():
    with pytest.raises(ValueError, match=r"K=96 .*pick a group size that divides 96"):
        check_weight(torch.randn(4, 96), 64, name="layer.weight")
    with pytest.raises(ValueError, match="layer.weight"):
        check_weight(torch.randn(4, 96), 64, name="layer.weight")
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        check_weight(torch.randn(4, 64), 0)
    for bad in (1, 9, 3.0):
        with pytest.raises(ValueError, match="bits must be an integer in"):
            quantize_rtn(torch.randn(4, 64), bad, 64)
