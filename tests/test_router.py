"""milo::router_topk and fuse_router_topk: a top-k router's forward (GEMM, softmax, top-k, renormalization) as
one op, against torch's own ops (float64 where the model is) and transformers' router forwards."""

import pytest
import torch
from models import decode_step, static_cache_decode_logits, tiny_moe

from milo_tensor import fuse_router_topk, milo_int3, quantize_
from milo_tensor.ops import reference as ref_ops


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_reference_op_is_linear_softmax_topk(renormalize, dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 40, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(12, 40, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    logits, w, idx = torch.ops.milo.router_topk(x, weight, 4, renormalize)
    assert logits.dtype == dtype and logits.shape == (9, 12)
    torch.testing.assert_close(logits.double(), x.double() @ weight.double().T,
                               **({} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}))
    probs = torch.softmax(logits.double(), dim=-1)
    assert w.dtype == torch.float32 and idx.dtype == torch.int64 and w.shape == idx.shape == (9, 4)
    chosen = probs.gather(-1, idx)
    assert torch.equal(chosen.sort(-1, descending=True).values, probs.topk(4, -1).values)  # the 4 largest
    want = chosen / chosen.sum(-1, keepdim=True) if renormalize else chosen
    torch.testing.assert_close(w.double(), want, rtol=1e-6, atol=1e-7)
    assert (w[:, :-1] >= w[:, 1:]).all(), "descending, as torch.topk"


def test_reference_op_refuses_bad_input():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 4\]"):
        ref_ops.router_topk(torch.randn(2, 8), torch.randn(4, 8), 5, True)
    with pytest.raises(ValueError, match=r"x must be \[tokens, hidden\] and weight \[experts, hidden\]"):
        ref_ops.router_topk(torch.randn(2, 8), torch.randn(4, 7), 2, True)
    with pytest.raises(ValueError, match=r"x must be \[tokens, hidden\]"):
        ref_ops.router_topk(torch.randn(2, 3, 8), torch.randn(4, 8), 2, True)


def _tiny(family, **overrides):
    model = tiny_moe(family, **overrides).double()
    model.config._experts_implementation = "eager"  # grouped_mm takes no float64
    return model


def _routers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


@pytest.mark.parametrize("family,expected", [("mixtral", 2), ("qwen3_moe", 2), ("qwen2_moe", 2), ("olmoe", 2),
                                             ("deepseek_v3", 0)])
def test_fused_routers_decode_as_before(family, expected):
    """Every top-k router of the family swapped (DeepSeek-V3's grouped, biased sigmoid router left alone),
    the same greedy decode logits as the model before, in float64; a second call swaps nothing new."""
    model = _tiny(family)
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    before = static_cache_decode_logits(model, ids, decode_step(model))
    assert fuse_router_topk(model) == expected
    assert fuse_router_topk(model) == expected
    swapped = [m for m in model.modules() if hasattr(m, "_milo_router")]
    assert len(swapped) == expected
    after = static_cache_decode_logits(model, ids, decode_step(model))
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
    assert set(model.state_dict()) == set(tiny_moe(family).state_dict())  # parameters untouched


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen_router_follows_norm_topk_prob(norm_topk_prob):
    model = _tiny("qwen3_moe", norm_topk_prob=norm_topk_prob)
    router = _routers(model)[0]
    x = torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    own = router(x)
    assert fuse_router_topk(model) == 2
    for a, b in zip(router(x), own):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert router._milo_router == (norm_topk_prob, True)


def test_router_of_another_form_is_left_alone():
    """A router whose forward is not softmax -> top-k (here: sigmoid scores) keeps its forward."""
    model = _tiny("mixtral")
    router = _routers(model)[0]
    cls = type(router)

    def sigmoid_forward(self, hidden_states):
        logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        w, idx = torch.topk(torch.sigmoid(logits), self.top_k, dim=-1)
        return logits, w, idx

    router.__class__ = type("SigmoidRouter", (cls,), {"forward": sigmoid_forward})
    assert fuse_router_topk(model) == 1  # the other layer's router only
    assert type(router).__name__ == "SigmoidRouter" and not hasattr(router, "_milo_router")


def test_compiled_fullgraph():
    model = _tiny("mixtral")
    fuse_router_topk(model)
    router = _routers(model)[0]
    x = torch.randn(3, 64, dtype=torch.float64)
    with torch.no_grad():
        eager = router(x)
        compiled = torch.compile(router, fullgraph=True, backend="aot_eager")(x)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_training_takes_the_routers_own_forward():
    """The op has no backward: with gradients needed the router runs its own ops, and they flow to its weight."""
    model = _tiny("mixtral")
    fuse_router_topk(model)
    router = _routers(model)[0]
    _, w, _ = router(torch.randn(3, 64, dtype=torch.float64))
    (w * torch.tensor([1.0, 3.0], dtype=w.dtype)).sum().backward()  # (renormalized weights sum to 1 a token)
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_quantized_model_compiles_fullgraph_with_fused_routers():
    """A quantized Qwen3-MoE with its routers fused compiles whole (the op's fake impl) and gives the logits of
    the model before fusion."""
    model = tiny_moe("qwen3_moe")
    quantize_(model, milo_int3(4, iters=2), progress=False)
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids).logits
        assert fuse_router_topk(model) == 2
        out = torch.compile(model, fullgraph=True)(ids).logits
    torch.testing.assert_close(out, before, rtol=1e-4, atol=1e-4)
