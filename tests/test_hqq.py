"""The half-quadratic (HQQ) zero-point solver, against plain RTN and the hqq package itself."""

import pytest
import torch

from milo_tensor.quant.affine import quantize_codes, quantize_rtn
from milo_tensor.quant.hqq import quantize_hqq
from weights import rel, student_t


pytestmark = pytest.mark.usefixtures("one_thread")


def laplace(shape, gen, scale=0.02):
    u = torch.rand(shape, generator=gen) - 0.5
    return -scale * u.sign() * torch.log1p(-2 * u.abs())


def group_sq_err(w, deq, g=64):
    d = (w - deq).reshape(*w.shape[:-1], w.shape[-1] // g, g)
    return d.square().sum(-1)


CASES = [
    ("t3", (128, 256), 0.02),
    ("t3", (256, 128), 1.0),  # unit-scale weights: the lp shrinkage is active
    ("laplace", (64, 512), 0.02),
    ("laplace", (96, 256), 1.0),
]


@pytest.mark.parametrize("dist, shape, scale", CASES)
def test_matches_or_beats_hqq_package(gen, dist, shape, scale):
    hqq_quantize = pytest.importorskip("hqq.core.quantize")
    w = student_t(shape, gen, scale=scale) if dist == "t3" else laplace(shape, gen, scale=scale)
    w_q, meta = hqq_quantize.Quantizer.quantize(
        w.clone(), nbits=3, group_size=64, optimize=True, axis=1, device="cpu"
    )
    meta["compute_dtype"] = torch.float32  # dequantize in float32 (its default is fp16)
    theirs = rel(hqq_quantize.Quantizer.dequantize(w_q, meta).reshape(shape), w)
    ours = rel(quantize_hqq(w, 3, 64).dequantize(), w)
    rtn = rel(quantize_rtn(w, 3, 64).dequantize(), w)
    print(f"{dist} {shape} x{scale}: rtn {rtn:.6f} hqq-package {theirs:.6f} ours {ours:.6f}")
    assert ours <= 1.01 * theirs
    assert ours < rtn


def test_beats_rtn_and_never_worse_per_group(gen):
    w = student_t((128, 256), gen)
    rtn = quantize_rtn(w, 3, 64)
    q = quantize_hqq(w, 3, 64)
    # each group keeps its best zero, and the min/max start is a candidate
    assert (group_sq_err(w, q.dequantize()) <= group_sq_err(w, rtn.dequantize()) * (1 + 1e-5) + 1e-12).all()
    assert rel(q.dequantize(), w) < 0.97 * rel(rtn.dequantize(), w)
    # scale is HQQ's min/max scale: only the zero point moves
    assert torch.equal(q.scale, rtn.scale) and not torch.equal(q.zero, rtn.zero)


def test_zero_iterations_is_rtn(gen):
    w = student_t((64, 128), gen)
    q, r = quantize_hqq(w, 3, 64, iters=0), quantize_rtn(w, 3, 64)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.zero, r.zero)


def test_more_iterations_help_without_early_stop(gen):
    w = student_t((128, 256), gen, scale=1.0)
    errs = [rel(quantize_hqq(w, 3, 64, iters=i, early_stop=False).dequantize(), w) for i in (0, 5, 40)]
    assert errs[0] > errs[1] > errs[2]


def test_batched_stack_equals_separate_calls(gen):
    w = torch.stack([student_t((64, 128), gen, scale=s) for s in (0.02, 1.0, 0.5)])
    q = quantize_hqq(w, 3, 64)
    assert q.codes.shape == w.shape and q.zero.shape == (3, 64, 2)
    for e in range(3):
        qe = quantize_hqq(w[e], 3, 64)
        assert torch.equal(q.codes[e], qe.codes)
        assert torch.allclose(q.zero[e], qe.zero, atol=1e-6)


@pytest.mark.parametrize("qdtype", [torch.float16, torch.bfloat16])
def test_qparam_dtype_codes_recomputed(gen, qdtype):
    w = student_t((128, 256), gen)
    q = quantize_hqq(w, 3, 64, qparam_dtype=qdtype)
    assert q.scale.dtype == q.zero.dtype == qdtype
    assert torch.equal(q.codes, quantize_codes(w, q.scale, q.zero, 3, 64))
    assert rel(q.dequantize(), w) < rel(quantize_rtn(w, 3, 64, qparam_dtype=qdtype).dequantize(), w)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_other_bit_widths(gen, bits):
    w = student_t((64, 256), gen)
    q = quantize_hqq(w, bits, 64)
    assert int(q.codes.max()) <= 2**bits - 1
    assert rel(q.dequantize(), w) <= rel(quantize_rtn(w, bits, 64).dequantize(), w) * (1 + 1e-6)


def test_constant_groups_and_bad_input(gen):
    w = student_t((4, 128), gen)
    w[0, :64] = 0.0
    w[1, 64:] = 0.5
    q = quantize_hqq(w, 3, 64, qparam_dtype=torch.float16)
    deq = q.dequantize()
    assert torch.isfinite(deq).all()
    assert torch.allclose(deq[0, :64], w[0, :64]) and torch.allclose(deq[1, 64:], w[1, 64:], rtol=1e-3)
    with pytest.raises(ValueError, match="lp_norm"):
        quantize_hqq(w, lp_norm=1.5)
    with pytest.raises(ValueError, match="kappa"):
        quantize_hqq(w, kappa=0.5)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        quantize_hqq(w, 3, 96)
    with pytest.raises(ValueError, match="NaN"):
        quantize_hqq(torch.full((2, 64), float("nan")))
