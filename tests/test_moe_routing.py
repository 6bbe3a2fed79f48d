"""The MoE routing ops (milo::moe_route, milo::moe_combine) against plain Python loops.

moe_route must be a stable sort of the (token, choice) pairs by expert with the out-of-range ids
(expert-parallel sentinels) last; moe_combine the per-token weighted sum of the chosen rows, with
dropped choices adding nothing whatever their weight (NaN included). The CUDA implementations are
checked against these ops in tests/test_moe_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

import milo_tensor  # noqa: F401  (registers the ops)


def _python_route(ids: list[list[int]], num_experts: int):
    pairs = [(e if 0 <= e < num_experts else num_experts, t, j) for t, row in enumerate(ids) for j, e in enumerate(row)]
    order = sorted(range(len(pairs)), key=lambda i: (pairs[i][0], i))  # stable by key
    token_of_row = [pairs[i][1] for i in order]
    row_of_choice = [0] * len(pairs)
    for row, i in enumerate(order):
        row_of_choice[i] = row
    offsets = [sum(1 for p in pairs if p[0] <= e) for e in range(num_experts)]
    return token_of_row, row_of_choice, offsets


def _random_ids(gen, tokens, top_k, num_experts, sentinels):
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)]) if tokens else (
        torch.zeros(0, top_k, dtype=torch.int64))
    if sentinels:
        drop = torch.rand(tokens, top_k, generator=gen) < 0.3
        bad = torch.tensor([num_experts, -1, num_experts + 7])[torch.randint(0, 3, (tokens, top_k), generator=gen)]
        ids = torch.where(drop, bad, ids)
    return ids


@pytest.mark.parametrize("tokens,top_k,num_experts", [(1, 2, 8), (7, 2, 8), (33, 8, 128), (5, 6, 64), (0, 2, 4)])
@pytest.mark.parametrize("sentinels", [False, True])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_route_is_a_stable_sort_by_expert(gen, tokens, top_k, num_experts, sentinels, id_dtype):
    ids = _random_ids(gen, tokens, top_k, num_experts, sentinels).to(id_dtype)
    got = torch.ops.milo.moe_route(ids, num_experts)
    want = _python_route(ids.tolist(), num_experts)
    for g, w in zip(got, want):
        assert g.dtype == torch.int32
        assert g.tolist() == w


def test_route_one_expert_takes_all_and_empty_experts():
    ids = torch.tensor([[2, 0]] * 5)
    token_of_row, row_of_choice, offsets = torch.ops.milo.moe_route(ids, 4)
    assert offsets.tolist() == [5, 5, 10, 10]
    assert token_of_row.tolist() == [0, 1, 2, 3, 4] * 2
    assert row_of_choice.tolist() == [5, 0, 6, 1, 7, 2, 8, 3, 9, 4]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_combine_is_the_weighted_sum_of_chosen_rows(gen, dtype):
    tokens, top_k, num_experts, hidden = 9, 3, 6, 20
    ids = _random_ids(gen, tokens, top_k, num_experts, sentinels=True)
    _, row_of_choice, offsets = torch.ops.milo.moe_route(ids, num_experts)
    out = torch.randn(tokens * top_k, hidden, generator=gen, dtype=torch.float64)
    weights = torch.rand(tokens, top_k, generator=gen, dtype=torch.float64)
    weights[ids >= num_experts] = float("nan")  # a dropped choice's weight must not leak in
    got = torch.ops.milo.moe_combine(out.to(dtype), row_of_choice, weights.to(dtype), offsets)
    assert got.dtype == dtype and got.shape == (tokens, hidden)
    want = torch.zeros(tokens, hidden, dtype=torch.float64)
    end = int(offsets[-1])
    for t in range(tokens):
        for j in range(top_k):
            row = int(row_of_choice[t * top_k + j])
            if row < end:
                want[t] += weights[t, j].to(dtype).double() * out[row].to(dtype).double()
    assert torch.isfinite(got).all()
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_routing_ops_compile_fullgraph(gen):
    ids = _random_ids(gen, 6, 2, 8, sentinels=True)
    out = torch.randn(12, 16, generator=gen)
    weights = torch.rand(6, 2, generator=gen)

    def glue(ids, out, weights):
        _, row_of_choice, offsets = torch.ops.milo.moe_route(ids, 8)
        return torch.ops.milo.moe_combine(out, row_of_choice, weights, offsets)

    torch.testing.assert_close(torch.compile(glue, fullgraph=True)(ids, out, weights), glue(ids, out, weights))


def test_bad_inputs_name_the_problem(gen):
    with pytest.raises(ValueError, match="integer tensor"):
        torch.ops.milo.moe_route(torch.rand(3, 2), 4)
    ids = _random_ids(gen, 4, 2, 8, sentinels=False)
    _, row_of_choice, offsets = torch.ops.milo.moe_route(ids, 8)
    out = torch.randn(8, 16, generator=gen)
    with pytest.raises(ValueError, match="one row per"):
        torch.ops.milo.moe_combine(out, row_of_choice[:-1], torch.rand(4, 2), offsets)
    with pytest.raises(ValueError, match=r"\[tokens, top_k\]"):
        torch.ops.milo.moe_combine(out, row_of_choice, torch.rand(8), offsets)
