"""The "milo" experts path against transformers' own eager experts loop, in float64."""

import copy

import pytest
import torch

from milo_tensor import MiLoInt3Tensor
from milo_tensor.integrations.experts import _gate_is_silu_mul, milo_experts_forward
from models import tiny_moe
from test_tensor import random_parts


def _experts_pair(gen, family="mixtral", ranks=(4, 0, 8, 2)):
    model = tiny_moe(family)
    experts = next(layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    e, n2, h = experts.gate_up_proj.shape
    i = experts.down_proj.shape[-1]
    up, _ = random_parts(gen, n2, h, ranks, experts=e, dtype=torch.float64)
    down, _ = random_parts(gen, h, i, ranks[::-1], experts=e, dtype=torch.float64)
    reference = copy.deepcopy(experts).double()
    with torch.no_grad():
        reference.gate_up_proj.copy_(up.dequantize())
        reference.down_proj.copy_(down.dequantize())
    quantized = copy.deepcopy(experts).double()
    quantized.gate_up_proj = torch.nn.Parameter(up, requires_grad=False)
    quantized.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return reference, quantized


def _eager(module, hidden, index, weights):
    module.config._experts_implementation = "eager"
    return module(hidden, index, weights)


ROUTINGS = {  # (tokens, experts, top_k, generator) -> top_k_index [tokens, top_k]
    "random": lambda t, e, k, g: torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]),
    # every token's first choice is expert 2: it takes all tokens, experts 1 and 3 get none
    "one_expert_takes_all": lambda t, e, k, g: torch.tensor([[2, 0]] * t),
    # only experts 1 and 3 are used; 0 and 2 are empty
    "empty_experts": lambda t, e, k, g: torch.tensor([[1, 3], [3, 1]] * t)[:t],
}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("tokens", [1, 7])
def test_grouped_path_equals_eager_loop(gen, family, routing, tokens):
    reference, quantized = _experts_pair(gen, family)
    e, k = reference.num_experts, 2
    hidden = torch.randn(tokens, reference.hidden_dim, generator=gen, dtype=torch.float64)
    index = ROUTINGS[routing](tokens, e, k, gen)
    weights = torch.rand(tokens, k, generator=gen, dtype=torch.float64)
    expected = _eager(reference, hidden, index, weights)
    got = milo_experts_forward(quantized, hidden, index, weights)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    # transformers' eager loop over w[e] on the quantized tensor gives the same result too
    torch.testing.assert_close(_eager(quantized, hidden, index, weights), expected, rtol=1e-9, atol=1e-10)


def test_expert_parallel_sentinels_are_dropped(gen):
    reference, quantized = _experts_pair(gen)
    e = reference.num_experts
    hidden = torch.randn(5, reference.hidden_dim, generator=gen, dtype=torch.float64)
    index = torch.tensor([[0, e], [e, 1], [2, 3], [e, e], [1, 0]])
    weights = torch.rand(5, 2, generator=gen, dtype=torch.float64)
    kept = torch.where(index < e, weights, torch.zeros_like(weights))
    expected = _eager(reference, hidden, index.clamp(max=e - 1), kept)
    torch.testing.assert_close(milo_experts_forward(quantized, hidden, index, weights), expected, rtol=1e-9, atol=1e-10)


def _junk_padding(w: MiLoInt3Tensor, gen) -> MiLoInt3Tensor:
    """w with each expert's rows past its rank (zero padding) made random: a path that reads them differs."""
    ut, v = w.ut.clone(), w.v.clone()
    for e, r in enumerate(w.ranks):
        ut[e, r:] = torch.randn(ut[e, r:].shape, generator=gen, dtype=ut.dtype)
        v[e, r:] = torch.randn(v[e, r:].shape, generator=gen, dtype=v.dtype)
    return w._with(ut=ut, v=v)


def test_reference_grouped_op_takes_each_experts_rank(gen):
    w, _ = random_parts(gen, 64, 128, (3, 0, 8, 5), experts=4, dtype=torch.float64)
    junk = _junk_padding(w, gen)
    x = torch.randn(7, 128, generator=gen, dtype=torch.float64)
    offsets = torch.tensor([2, 2, 5, 7])
    op = torch.ops.milo.int3_grouped_linear
    clean = op(x, offsets, w.qdata, w.scales, w.zeros, w.ut, w.v, 64)
    ranks = torch.tensor(w.ranks, dtype=torch.int32)
    torch.testing.assert_close(op(x, offsets, junk.qdata, junk.scales, junk.zeros, junk.ut, junk.v, 64, ranks=ranks),
                               clean, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(op(x, offsets, junk.qdata, junk.scales, junk.zeros, junk.ut, junk.v, 64), clean)
    with pytest.raises(ValueError, match="ranks must be a 1-D integer tensor of the 4 experts"):
        op(x, offsets, w.qdata, w.scales, w.zeros, w.ut, w.v, 64, ranks=torch.tensor([3, 0]))


@pytest.mark.parametrize("compiled", [False, True])
def test_grouped_path_gives_the_op_each_experts_rank(gen, compiled):
    """A stack with ragged ranks hands them to the grouped op (eager: one cached device tensor; compiled:
    a constant of the graph), so a kernel may skip each expert's padding: made random here, it must not
    show. A stack whose experts all have R passes none."""
    from milo_tensor.integrations.experts import _ranks_arg

    reference, quantized = _experts_pair(gen)
    assert _ranks_arg(quantized.gate_up_proj).tolist() == [4, 0, 8, 2]
    assert _ranks_arg(quantized.gate_up_proj) is _ranks_arg(quantized.gate_up_proj)
    uniform, _ = random_parts(gen, 64, 128, (4, 4, 4, 4), experts=4)
    assert _ranks_arg(uniform) is None
    for name in ("gate_up_proj", "down_proj"):
        setattr(quantized, name, torch.nn.Parameter(_junk_padding(getattr(quantized, name), gen), requires_grad=False))
    hidden = torch.randn(6, reference.hidden_dim, generator=gen, dtype=torch.float64)
    index = ROUTINGS["random"](6, reference.num_experts, 2, gen)
    weights = torch.rand(6, 2, generator=gen, dtype=torch.float64)
    forward = milo_experts_forward
    if compiled:
        forward = torch.compile(lambda m, h, i, w: milo_experts_forward(m, h, i, w), fullgraph=True)
    expected = _eager(reference, hidden, index, weights)
    torch.testing.assert_close(forward(quantized, hidden, index, weights), expected, rtol=1e-9, atol=1e-10)


def test_grouped_op_compiles_fullgraph(gen):
    _, quantized = _experts_pair(gen)
    hidden = torch.randn(6, quantized.hidden_dim, generator=gen, dtype=torch.float64)
    index = ROUTINGS["random"](6, quantized.num_experts, 2, gen)
    weights = torch.rand(6, 2, generator=gen, dtype=torch.float64)
    eager = milo_experts_forward(quantized, hidden, index, weights)
    compiled = torch.compile(lambda h, i, w: milo_experts_forward(quantized, h, i, w), fullgraph=True)
    torch.testing.assert_close(compiled(hidden, index, weights), eager)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe"])
def test_default_gate_runs_inside_the_down_op(gen, family):
    """These families gate with silu(gate) * up, which the down projection's op applies itself."""
    _, quantized = _experts_pair(gen, family)
    assert _gate_is_silu_mul(quantized)


def test_other_gates_run_between_the_ops(gen, monkeypatch):
    """Another activation, or a model's own `_apply_gate`, is not fused: it runs as the model defines it."""
    reference, quantized = _experts_pair(gen)
    reference.act_fn = torch.nn.GELU()
    quantized.act_fn = torch.nn.GELU()
    assert not _gate_is_silu_mul(quantized)
    hidden = torch.randn(4, reference.hidden_dim, generator=gen, dtype=torch.float64)
    index = ROUTINGS["random"](4, reference.num_experts, 2, gen)
    weights = torch.rand(4, 2, generator=gen, dtype=torch.float64)
    expected = _eager(reference, hidden, index, weights)
    torch.testing.assert_close(milo_experts_forward(quantized, hidden, index, weights), expected, rtol=1e-9, atol=1e-10)
    quantized.act_fn = torch.nn.SiLU()
    monkeypatch.setattr(type(quantized), "_apply_gate", lambda self, gate_up: gate_up[..., : gate_up.shape[-1] // 2])
    assert not _gate_is_silu_mul(quantized)
