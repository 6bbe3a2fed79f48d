"""milo::int3_grouped_linear's input options (the reference impl, CPU), against a float64 loop.

``x_rows`` makes row i of the input x[x_rows[i]] (an index outside [0, x.shape[0]) reads zeros), so
the router's token indices feed the gate_up op without a gather; ``activation="silu_mul"`` makes it
silu(gate) * up of the [gate | up] halves of x, so the gate_up output feeds the down op without an
activation kernel; ``out_activation="silu_mul"`` gates the op's own output instead (the gate_up op
hands the down op its input ready). The CUDA kernels are held to the same results in
tests/test_moe_cuda.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import milo_tensor  # noqa: F401  (registers the ops)
from test_tensor import float64_weight, random_parts


def _experts(gen, E, N, K, ranks, g=32):
    w, codes = random_parts(gen, N, K, ranks, experts=E, group_size=g, dtype=torch.float64)
    return w, float64_weight(codes, w.scales, w.zeros, w.ut, w.v, g)


def _op(x, offsets, w, **kw):
    return torch.ops.milo.int3_grouped_linear(x, offsets, w.qdata, w.scales, w.zeros, w.ut, w.v, w.group_size, **kw)


def _silu_mul(row: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a float64 [gate | up] row, by hand."""
    half = row.shape[0] // 2
    return torch.tensor([g / (1 + math.exp(-g)) * u for g, u in zip(row[:half].tolist(), row[half:].tolist())],
                        dtype=torch.float64)


def _loop(x, offsets, weights, x_rows, activation, out_activation="none"):
    """Row by row: pick the stored row, gate it by hand, multiply by its expert's float64 weight (and
    gate the product by hand)."""
    rows = len(x_rows) if x_rows is not None else x.shape[0]
    bounds = [0] + [int(o) for o in offsets]
    gated_out = out_activation == "silu_mul"
    out = torch.zeros(rows, weights.shape[1] // (2 if gated_out else 1), dtype=torch.float64)
    for e in range(weights.shape[0]):
        for i in range(bounds[e], bounds[e + 1]):
            src = i if x_rows is None else int(x_rows[i])
            row = x[src].double() if 0 <= src < x.shape[0] else torch.zeros(x.shape[1], dtype=torch.float64)
            if activation == "silu_mul":
                row = _silu_mul(row)
            out[i] = _silu_mul(weights[e] @ row) if gated_out else weights[e] @ row
    return out


@pytest.mark.parametrize("activation", ["none", "silu_mul"])
@pytest.mark.parametrize("rows_dtype", [torch.int32, torch.int64, None])
def test_gathered_gated_rows_equal_the_loop(gen, activation, rows_dtype):
    E, N, K, tokens, rows = 4, 24, 64, 5, 11
    w, weights = _experts(gen, E, N, K, (4, 0, 8, 2))
    x = torch.randn(tokens if rows_dtype is not None else rows, K * (2 if activation == "silu_mul" else 1),
                    generator=gen, dtype=torch.float64)
    x_rows = None
    if rows_dtype is not None:  # token indices, two outside the tokens (zero rows)
        x_rows = torch.randint(0, tokens, (rows,), generator=gen)
        x_rows[3], x_rows[8] = -1, tokens
        x_rows = x_rows.to(rows_dtype)
    offsets = torch.tensor([3, 3, 9, 10])  # expert 1 empty, row 10 a sentinel (zero output)
    got = _op(x, offsets, w, x_rows=x_rows, activation=activation)
    expected = _loop(x, offsets, weights, x_rows, activation)
    assert got.shape == (rows, N)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    assert (got[10] == 0).all()


@pytest.mark.parametrize("rows_dtype", [torch.int64, None])
def test_gated_output_equals_the_loop(gen, rows_dtype):
    """out_activation='silu_mul': y's [gate | up] halves gated, N / 2 columns; the sentinel row stays zero."""
    E, N, K, tokens, rows = 4, 24, 64, 5, 11
    w, weights = _experts(gen, E, N, K, (4, 0, 8, 2))
    x = torch.randn(tokens if rows_dtype is not None else rows, K, generator=gen, dtype=torch.float64)
    x_rows = None
    if rows_dtype is not None:
        x_rows = torch.randint(0, tokens, (rows,), generator=gen)
        x_rows[5] = tokens + 2
    offsets = torch.tensor([2, 6, 6, 10])  # expert 2 empty, row 10 a sentinel
    got = _op(x, offsets, w, x_rows=x_rows, out_activation="silu_mul")
    assert got.shape == (rows, N // 2)
    torch.testing.assert_close(got, _loop(x, offsets, weights, x_rows, "none", "silu_mul"), rtol=1e-9, atol=1e-10)
    assert (got[10] == 0).all()


def test_bf16_gated_output_rounds_like_the_next_op(gen):
    """In bf16 the gated output is the ungated y (rounded to bf16) gated in bf16, exactly as the down
    op's activation='silu_mul' would gate it: which op gates changes nothing downstream."""
    E, N, K, rows = 2, 64, 64, 6
    up, _ = random_parts(gen, N, K, (4, 2), experts=E, group_size=32, dtype=torch.bfloat16)
    down, _ = random_parts(gen, K, N // 2, (2, 4), experts=E, group_size=32, dtype=torch.bfloat16)
    x = torch.randn(rows, K, generator=gen).to(torch.bfloat16)
    offsets = torch.tensor([2, 6])
    y = _op(x, offsets, up)
    gate, up_half = y.chunk(2, dim=-1)
    h = _op(x, offsets, up, out_activation="silu_mul")
    torch.testing.assert_close(h, torch.nn.functional.silu(gate) * up_half, rtol=0, atol=0)
    torch.testing.assert_close(_op(h, offsets, down), _op(y, offsets, down, activation="silu_mul"), rtol=0, atol=0)


def test_bf16_gate_rounds_like_transformers(gen):
    """In bf16 the gate is silu(gate) * up in bf16, as transformers' default `_apply_gate` computes it."""
    E, N, K, rows = 2, 16, 64, 6
    w, _ = random_parts(gen, N, K, (4, 2), experts=E, group_size=32, dtype=torch.bfloat16)
    x = torch.randn(rows, 2 * K, generator=gen).to(torch.bfloat16)
    offsets = torch.tensor([2, 6])
    gate, up = x.chunk(2, dim=-1)
    expected = _op(torch.nn.functional.silu(gate) * up, offsets, w)
    torch.testing.assert_close(_op(x, offsets, w, activation="silu_mul"), expected, rtol=0, atol=0)


def test_bad_inputs_are_refused(gen):
    w, _ = _experts(gen, 2, 16, 64, (2, 2))
    x = torch.randn(4, 64, generator=gen, dtype=torch.float64)
    offsets = torch.tensor([2, 4])
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        _op(x, offsets, w, activation="gelu")
    with pytest.raises(ValueError, match="unknown out_activation 'relu'"):
        _op(x, offsets, w, out_activation="relu")
    odd, _ = _experts(gen, 2, 15, 64, (2, 2))
    with pytest.raises(ValueError, match="N must be even; got N = 15"):
        _op(x, offsets, odd, out_activation="silu_mul")
    with pytest.raises(ValueError, match="2K columns"):
        _op(x, offsets, w, activation="silu_mul")  # x holds only K columns
    with pytest.raises(ValueError, match="x_rows must be a 1-D integer tensor"):
        _op(x, offsets, w, x_rows=torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="x_rows must be a 1-D integer tensor"):
        _op(x, offsets, w, x_rows=torch.zeros(4))


def test_compiled_shapes_follow_x_rows(gen):
    """The fake impl: the output has one row per x_rows entry, not per row of x."""
    E, N, K = 2, 16, 64
    w, weights = _experts(gen, E, N, K, (2, 2))
    x = torch.randn(3, 2 * K, generator=gen, dtype=torch.float64)
    x_rows = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    offsets = torch.tensor([4, 7])
    f = torch.compile(lambda x, r: _op(x, offsets, w, x_rows=r, activation="silu_mul"), fullgraph=True)
    got = f(x, x_rows)
    assert got.shape == (7, N)
    torch.testing.assert_close(got, _loop(x, offsets, weights, x_rows, "silu_mul"), rtol=1e-9, atol=1e-10)
    g = torch.compile(lambda x, r: _op(x[:, :K], offsets, w, x_rows=r, out_activation="silu_mul"), fullgraph=True)
    got = g(x, x_rows)
    assert got.shape == (7, N // 2)
    torch.testing.assert_close(got, _loop(x[:, :K], offsets, weights, x_rows, "none", "silu_mul"), rtol=1e-9,
                               atol=1e-10)
