"""The MiLo loop (quantize ↔ low-rank fit, keep the best) and compensator quantization."""

import pytest
import torch

from milo_tensor.quant import compensator
from milo_tensor.quant.affine import quantize_codes, quantize_rtn
from milo_tensor.quant.compensator import (
    choose_svd,
    milo_compress,
    quantize_compensator,
    truncated_svd,
)
from milo_tensor.quant.hqq import quantize_hqq
from weights import rel, student_t


pytestmark = pytest.mark.usefixtures("one_thread")


def reconstruct64(res, e=None):
    """deq(Q) + U V in float64, from the returned pieces only."""
    q = res.quantized
    codes, scale, zero, u, v = q.codes, q.scale, q.zero, res.u, res.v
    if e is not None:
        codes, scale, zero, u, v = codes[e], scale[e], zero[e], u[e], v[e]
    g = q.group_size
    s = scale.double().repeat_interleave(g, -1)
    z = zero.double().repeat_interleave(g, -1)
    return (codes.double() - z) * s + u.double() @ v.double()


def test_error_order_milo_hqq_rtn(gen):
    w = student_t((128, 256), gen)
    rtn = rel(quantize_rtn(w, 3, 64).dequantize(), w)
    hqq = rel(quantize_hqq(w, 3, 64).dequantize(), w)
    milo = milo_compress(w, 16, iters=5)
    assert milo.rel_error[0] < hqq < rtn
    assert milo.rel_error[0] < 0.85 * hqq


def test_error_falls_strictly_with_rank(gen):
    w = student_t((128, 256), gen)
    errs = [milo_compress(w, r, iters=4).rel_error[0] for r in (0, 4, 16, 64)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # rank 0 is exactly one HQQ quantize
    assert errs[0] == pytest.approx(rel(quantize_hqq(w, 3, 64).dequantize(), w), rel=1e-6)


@pytest.mark.parametrize("qdtype", [None, torch.bfloat16])
def test_returned_error_matches_float64_recomputation(gen, qdtype):
    w = student_t((128, 256), gen)
    res = milo_compress(w, 16, iters=6, svd="exact", qparam_dtype=qdtype)
    assert res.quantized.scale.dtype == (qdtype or torch.float32)
    assert res.u.dtype == res.v.dtype == torch.float32
    assert res.u.shape == (128, 16) and res.v.shape == (16, 256) and res.ranks == (16,)
    w64 = w.double()
    recomputed = float((w64 - reconstruct64(res)).norm() / w64.norm())
    assert res.rel_error[0] == pytest.approx(recomputed, rel=1e-5)
    # the codes are the nearest ones for the stored qparams of the kept iterate's target
    first = milo_compress(w, 16, iters=1, svd="exact", qparam_dtype=qdtype)
    assert res.rel_error[0] <= first.rel_error[0]
    assert res.rel_error[0] < 0.97 * first.rel_error[0]  # the loop does help


def test_keeps_best_iterate_not_last(gen, monkeypatch):
    """Make every quantize after the first one bad: the result must be the first iterate."""
    w = student_t((64, 128), gen)
    good = milo_compress(w, 8, iters=1, svd="exact")
    real = compensator._quantize
    calls = []

    def worse_after_first(name, x, bits, group_size, qparam_dtype):
        calls.append(1)
        if len(calls) > 1:  # coarser grid: a much worse quantization
            x = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(len(calls)))
        return real(name, x, bits, group_size, qparam_dtype)

    monkeypatch.setattr(compensator, "_quantize", worse_after_first)
    res = milo_compress(w, 8, iters=5, svd="exact")
    assert len(calls) == 5
    assert res.rel_error == pytest.approx(good.rel_error, rel=1e-6)
    assert torch.equal(res.quantized.codes, good.quantized.codes)
    assert torch.allclose(res.u @ res.v, good.u @ good.v, atol=1e-6)


def test_ragged_expert_ranks_padding_and_independence(gen):
    w = student_t((3, 64, 128), gen)
    ranks = (0, 8, 24)
    res = milo_compress(w, ranks, iters=4, svd="exact")
    assert res.ranks == ranks and res.u.shape == (3, 64, 24) and res.v.shape == (3, 24, 128)
    assert res.quantized.codes.shape == w.shape and res.quantized.scale.shape == (3, 64, 2)
    for e, r in enumerate(ranks):
        assert (res.u[e, :, r:] == 0).all() and (res.v[e, r:, :] == 0).all()
        if r:
            assert (res.u[e, :, :r].abs().sum(0) > 0).all() and (res.v[e, :r].abs().sum(1) > 0).all()
        alone = milo_compress(w[e], r, iters=4, svd="exact")
        assert res.rel_error[e] == pytest.approx(alone.rel_error[0], rel=1e-4)
        assert (res.quantized.codes[e] == alone.quantized.codes).float().mean() > 0.999
        w64 = w[e].double()
        assert float((w64 - reconstruct64(res, e)).norm() / w64.norm()) == pytest.approx(res.rel_error[e], rel=1e-5)


def test_leading_dims_and_int_rank_broadcast(gen):
    w = student_t((2, 2, 32, 64), gen)
    res = milo_compress(w, 4, group_size=32, iters=2, quantizer="rtn")
    assert res.ranks == (4, 4, 4, 4) and len(res.rel_error) == 4
    assert res.quantized.codes.shape == w.shape and res.u.shape == (2, 2, 32, 4) and res.v.shape == (2, 2, 4, 64)


@pytest.mark.parametrize("quantizer, fn", [("rtn", quantize_rtn), ("hqq", quantize_hqq)])
def test_rank_zero_is_a_single_quantize(gen, quantizer, fn):
    w = student_t((64, 128), gen)
    res = milo_compress(w, 0, quantizer=quantizer, qparam_dtype=torch.float16)
    ref = fn(w, 3, 64, qparam_dtype=torch.float16)
    assert torch.equal(res.quantized.codes, ref.codes) and torch.equal(res.quantized.zero, ref.zero)
    assert res.u.shape == (64, 0) and res.v.shape == (0, 128)


def test_lowrank_svd_is_close_to_exact(gen):
    w = student_t((2, 128, 512), gen)
    exact = milo_compress(w, 8, iters=6, svd="exact")
    low = milo_compress(w, 8, iters=6, svd="lowrank")
    for a, b in zip(low.rel_error, exact.rel_error):
        assert a <= b * 1.01
    # the randomized factorization alone: captured energy close to the optimum
    e = w - quantize_rtn(w, 3, 64).dequantize()
    _, s_exact, _ = truncated_svd(e, 8, "exact")
    u, s, vh = truncated_svd(e, 8, "lowrank", generator=torch.Generator().manual_seed(0))
    # leading singular values tight; the tail of a flat residual spectrum is where a sketch drifts
    assert torch.allclose(s[..., :4], s_exact[..., :4], rtol=0.03)
    assert torch.allclose(s, s_exact, rtol=0.10)
    assert torch.allclose(u.mT @ u, torch.eye(8).expand(2, 8, 8), atol=1e-5)
    assert (s.square().sum(-1) >= 0.97 * s_exact.square().sum(-1)).all()
    # deterministic for a seed
    again = milo_compress(w, 8, iters=6, svd="lowrank")
    assert again.rel_error == low.rel_error


def test_auto_svd_choice():
    assert choose_svd(64, 256, 4) == "exact"  # tiny: exact is cheap
    assert choose_svd(256, 256, 8) == "lowrank"
    assert choose_svd(14336, 4096, 32) == "lowrank"  # r << min(N, K)
    assert choose_svd(4096, 4096, 512) == "lowrank"
    assert choose_svd(2048, 2048, 480) == "exact"  # r large relative to the shape
    assert choose_svd(14336, 4096, 32, "exact") == "exact"
    with pytest.raises(ValueError, match="unknown svd method 'qr'"):
        choose_svd(8, 8, 1, "qr")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shape=(64, 96), ranks=4), "not a multiple of group_size=64"),
        (dict(shape=(64, 128), ranks=65), r"rank 65 exceeds min\(N, K\) = 64 for a weight of shape \(64, 128\)"),
        (dict(shape=(2, 64, 128), ranks=(4, 100)), r"rank 100 \(expert 1\) exceeds .*\(2, 64, 128\)"),
        (dict(shape=(64, 128), ranks=-1), "rank must be >= 0"),
        (dict(shape=(2, 64, 128), ranks=(4, 4, 4)), "got 3 ranks for a weight of shape"),
        (dict(shape=(64, 128), ranks=4, quantizer="gptq"), r"unknown quantizer 'gptq'.*'hqq', 'rtn'"),
        (dict(shape=(64, 128), ranks=4, svd="qr"), "unknown svd method"),
        (dict(shape=(64, 128), ranks=4, iters=-1), "iters must be an integer >= 0"),
        (dict(shape=(64, 128), ranks=4, bits=1), "bits must be an integer in"),
    ],
)
def test_bad_arguments(gen, kwargs, match):
    kwargs = {"iters": 1, **kwargs}
    shape, ranks = kwargs.pop("shape"), kwargs.pop("ranks")
    with pytest.raises(ValueError, match=match):
        milo_compress(student_t(shape, gen), ranks, **kwargs)


@pytest.mark.parametrize(
    "w, match",
    [
        (torch.ones(64, 128, dtype=torch.int32), "floating-point"),
        (torch.full((64, 128), float("nan")), "NaN"),
        (torch.full((64, 128), float("inf")), "Inf"),
        (torch.ones(128), "at least 2 dims"),
    ],
)
def test_bad_weights(w, match):
    with pytest.raises(ValueError, match=match):
        milo_compress(w, 4)


@pytest.mark.parametrize("bits, max_rel", [(8, 0.01), (3, 0.3)])
def test_quantize_compensator(gen, bits, max_rel):
    m = student_t((3, 16, 128), gen)
    q = quantize_compensator(m, bits, 64, qparam_dtype=torch.bfloat16)
    assert q.codes.shape == m.shape and int(q.codes.max()) <= 2**bits - 1
    assert q.scale.shape == (3, 16, 2) and q.scale.dtype == torch.bfloat16
    assert torch.equal(q.codes, quantize_codes(m, q.scale, q.zero, bits, 64))
    assert rel(q.dequantize(), m) < max_rel
    empty = quantize_compensator(torch.zeros(3, 0, 128), bits, 64)  # rank 0 everywhere
    assert empty.codes.shape == (3, 0, 128) and empty.scale.shape == (3, 0, 2)


def test_quantize_compensator_bad_input(gen):
    m = student_t((4, 96), gen)
    with pytest.raises(ValueError, match=r"row of length 96 .* not a multiple of the compensator group size 64"):
        quantize_compensator(m, 3, 64)
    with pytest.raises(ValueError, match=r"compensator bits must be one of \(3, 8\)"):
        quantize_compensator(m, 4, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(gen):
    w = student_t((2, 128, 256), gen)
    cpu = milo_compress(w, (8, 16), iters=3, svd="exact")
    gpu = milo_compress(w.cuda(), (8, 16), iters=3, svd="exact")
    assert gpu.u.device.type == "cuda" and gpu.quantized.codes.device.type == "cuda"
    for a, b in zip(gpu.rel_error, cpu.rel_error):
        assert a == pytest.approx(b, rel=1e-3)
