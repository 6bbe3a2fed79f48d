"""MiLoInt3Tensor against float64 math computed from its own codes, on random parts."""

import io

import pytest
import torch
import torch.nn.functional as F

from milo_tensor import MiLoInt3Tensor
from milo_tensor.quant.packing import pack_int3, unpack_int3


def random_parts(gen, n, k, ranks, experts=None, group_size=64, dtype=torch.float32):
    lead = () if experts is None else (experts,)
    codes = torch.randint(0, 8, (*lead, n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand((*lead, n, k // group_size), generator=gen) * 0.02 + 0.005).to(dtype)
    zeros = (torch.rand((*lead, n, k // group_size), generator=gen) * 7).to(dtype)
    r_max = max(ranks)
    ut = torch.randn((*lead, r_max, n), generator=gen) * 0.05
    v = torch.randn((*lead, r_max, k), generator=gen) * 0.05
    if experts is not None:
        for e, r in enumerate(ranks):  # padded rows are exactly zero
            ut[e, r:] = 0
            v[e, r:] = 0
    shape = (*lead, n, k)
    t = MiLoInt3Tensor(pack_int3(codes), scales, zeros, ut.to(dtype), v.to(dtype), shape, group_size, ranks)
    return t, codes


def float64_weight(codes, scales, zeros, ut, v, group_size):
    """W = (Q - z) s + U V, written with repeat_interleave (not the library's reshape path)."""
    s = scales.double().repeat_interleave(group_size, dim=-1)
    z = zeros.double().repeat_interleave(group_size, dim=-1)
    return (codes.double() - z) * s + ut.double().transpose(-1, -2) @ v.double()


@pytest.mark.parametrize("n,k,r,group_size", [(96, 128, 8, 64), (64, 256, 0, 32), (128, 128, 16, 128)])
def test_linear_matches_float64(gen, n, k, r, group_size):
    w, codes = random_parts(gen, n, k, (r,), group_size=group_size)
    x = torch.randn(5, 3, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    ref = x.double() @ float64_weight(codes, w.scales, w.zeros, w.ut, w.v, group_size).T + bias.double()
    out = F.linear(x, w, bias)
    assert out.shape == (5, 3, n) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    # the same through mm / matmul / addmm on weight.t(), as a Linear's decomposition does
    x2 = x.reshape(-1, k)
    torch.testing.assert_close(torch.mm(x2, w.t()).double(), (ref - bias.double()).reshape(-1, n), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close((x @ w.t()).double(), ref - bias.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.addmm(bias, x2, w.t()).double(), ref.reshape(-1, n), rtol=1e-4, atol=1e-4)


def test_bf16_linear_close_to_float64(gen):
    w, codes = random_parts(gen, 64, 128, (4,), dtype=torch.bfloat16)
    x = torch.randn(4, 128, generator=gen).bfloat16()
    ref = x.double() @ float64_weight(codes, w.scales, w.zeros, w.ut, w.v, 64).T
    out = F.linear(x, w)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-2


def test_dequantize_and_expert_indexing(gen):
    ranks = (4, 0, 8)
    w, codes = random_parts(gen, 64, 128, ranks, experts=3)
    full = float64_weight(codes, w.scales, w.zeros, w.ut, w.v, 64)
    torch.testing.assert_close(w.dequantize().double(), full, rtol=1e-5, atol=1e-6)
    for e in range(3):
        we = w[e]
        assert isinstance(we, MiLoInt3Tensor) and we.shape == (64, 128) and we.ranks == (ranks[e],)
        assert we.ut.shape[0] == ranks[e]
        x = torch.randn(2, 128, generator=gen)
        torch.testing.assert_close(F.linear(x, we).double(), x.double() @ full[e].T, rtol=1e-4, atol=1e-4)
    idx = torch.tensor([2])[0]  # transformers' eager loop indexes with a 0-d tensor
    assert w[idx].ranks == (8,)
    with pytest.raises(IndexError):
        w[3]


def test_copy_clone_detach_to(gen):
    w, _ = random_parts(gen, 64, 128, (4,))
    for t in (w.clone(), w.detach()):
        assert torch.equal(t.qdata, w.qdata) and torch.equal(t.ut, w.ut)
    w2, _ = random_parts(gen, 64, 128, (4,))
    w2.copy_(w)
    assert torch.equal(w2.qdata, w.qdata) and torch.equal(w2.scales, w.scales) and torch.equal(w2.v, w.v)
    h = w.to(torch.bfloat16)
    assert h.dtype == torch.bfloat16 and h.qdata.dtype == torch.int32 and h.ut.dtype == torch.bfloat16
    assert torch.equal(h.qdata, w.qdata)
    assert w.to("cpu") is not None
    with pytest.raises(ValueError, match="floating-point"):
        w.to(torch.int8)


def test_parameter_and_state_dict_round_trip(gen):
    w, _ = random_parts(gen, 64, 128, (4, 2), experts=2)
    lin = torch.nn.Module()
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    buf = io.BytesIO()
    torch.save(lin.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["weight"]
    assert isinstance(loaded, MiLoInt3Tensor)
    for name in ("qdata", "scales", "zeros", "ut", "v"):
        assert torch.equal(getattr(loaded, name), getattr(w, name))
    assert loaded.ranks == (4, 2) and loaded.group_size == 64


def test_repr_and_bytes(gen):
    w, _ = random_parts(gen, 64, 128, (4, 0, 8), experts=3)
    text = repr(w)
    for part in ("shape=(3, 64, 128)", "bits=3", "group_size=64", "ranks=[4, 0, 8]", "bytes="):
        assert part in text
    qbytes = 3 * 64 * 128 * 3 // 8
    qparams = 2 * 3 * 64 * 2 * 4
    assert w.storage_nbytes() == qbytes + qparams + 3 * 8 * (64 + 128) * 4
    assert w.payload_nbytes() == qbytes + qparams + (4 + 0 + 8) * (64 + 128) * 4


def test_unsupported_op_names_itself(gen):
    w, _ = random_parts(gen, 64, 128, (4,))
    with pytest.raises(NotImplementedError, match="aten.(add|mul)"):
        w + w
    with pytest.raises(NotImplementedError, match="select"):
        w[0]


def test_dtype_mismatch_is_clear(gen):
    w, _ = random_parts(gen, 64, 128, (4,))
    with pytest.raises(ValueError, match="dtype"):
        F.linear(torch.randn(2, 128, dtype=torch.float64), w)


def test_compile_fullgraph_matches_eager(gen):
    w, _ = random_parts(gen, 96, 128, (8,))
    lin = torch.nn.Linear(128, 96)
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    x = torch.randn(3, 128, generator=gen)
    eager = lin(x)
    compiled = torch.compile(lin, fullgraph=True, backend="inductor")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_flatten_cache_follows_assignments(gen):
    """__tensor_flatten__ is cached (torch.compile calls it for every weight on every call): an
    assignment must show through, callers mutating what they got must not corrupt it, and a
    compiled function's metadata guard must still see a change and recompile."""
    from torch._dynamo.testing import CompileCounter
    from torchao.utils import TorchAOBaseTensor

    w, _ = random_parts(gen, 64, 128, (4,))
    assert w.__tensor_flatten__() == TorchAOBaseTensor.__tensor_flatten__(w)
    names, ctx = w.__tensor_flatten__()
    names.append("junk")
    ctx["group_size"] = 7
    assert w.__tensor_flatten__() == TorchAOBaseTensor.__tensor_flatten__(w)
    assert w.__tensor_flatten__()[1]["group_size"] == 64

    x = torch.randn(3, 128, generator=gen)
    cnt = CompileCounter()
    f = torch.compile(lambda x, w: F.linear(x, w), backend=cnt, fullgraph=True)
    f(x, w)
    f(x, w)
    assert cnt.frame_count == 1
    w.ranks = (3,)  # metadata only: seen only through __tensor_flatten__
    f(x, w)
    assert cnt.frame_count == 2
    w.ut_scales = torch.ones(4, 1)
    names, ctx = w.__tensor_flatten__()
    assert "ut_scales" in names and ctx["ranks"] == (3,)
    assert (names, ctx) == TorchAOBaseTensor.__tensor_flatten__(w)


def test_gradient_flows_to_activations(gen):
    w, codes = random_parts(gen, 64, 128, (4,))
    x = torch.randn(3, 128, generator=gen, requires_grad=True)
    F.linear(x, w).pow(2).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (x64 @ float64_weight(codes, w.scales, w.zeros, w.ut, w.v, 64).T).pow(2).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
