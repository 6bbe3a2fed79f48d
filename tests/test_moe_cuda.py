"""GPU tests of the CUDA implementation of milo::int3_grouped_linear (skipped without CUDA).

    pytest -q tests/test_moe_cuda.py          # on a CUDA machine

The op runs all experts of a layer in one GEMM launch: rows of x sorted by expert, offsets[e] =
end row of expert e (int32/int64 [E], on the device), ragged ranks padded with zeros in ut / v.
Every check draws fresh random inputs and routings, poisons the output memory with NaN first and
compares with a float32 per-expert reference: ||out - ref|| / ||ref|| < 3e-3, every row written
(rows past offsets[-1] must come back as zeros).
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch
from cuda_tiles import skip_unless_tile_runs, tile8_runs

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

import milo_tensor  # noqa: E402,F401  (registers the ops; loads the CUDA kernels when a GPU is visible)
from milo_tensor.ops import reference as ref_ops  # noqa: E402
from milo_tensor.ops.cuda import extension_status, load_extension  # noqa: E402
from milo_tensor.quant.packing import pack_int3, unpack_int3  # noqa: E402

TOL = 3e-3


@pytest.fixture(scope="module", autouse=True)
def _ext():
    if HAS_CUDA:
        assert load_extension(), f"the CUDA extension failed to build/load: {extension_status()}"
        for op in ("int3_grouped_linear", "moe_route", "moe_combine"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"milo::{op}", "CUDA"), op
    yield


def make_experts(E, N, K, ranks, g, dtype, gen):
    dev = "cuda"
    R = max(ranks) if ranks else 0
    codes = torch.randint(0, 8, (E, N, K), device=dev, generator=gen)
    q = pack_int3(codes)
    scales = (torch.rand(E, N, K // g, device=dev, generator=gen) * 0.01 + 0.005).to(dtype)
    zeros = (torch.rand(E, N, K // g, device=dev, generator=gen) * 7).to(dtype)
    ut = torch.zeros(E, R, N, device=dev, dtype=dtype)
    v = torch.zeros(E, R, K, device=dev, dtype=dtype)
    for e, r in enumerate(ranks):  # ragged ranks: rows r..R-1 stay zero
        if r:
            ut[e, :r] = (torch.randn(r, N, device=dev, generator=gen) * 0.05).to(dtype)
            v[e, :r] = (torch.randn(r, K, device=dev, generator=gen) * 0.05).to(dtype)
    return q, scales, zeros, ut, v


def routing_offsets(counts, rows, dtype=torch.int32):
    ends = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    assert int(ends[-1]) <= rows
    return ends.to(dtype).cuda()


def reference(x, counts, q, scales, zeros, ut, v, g):
    E, N = q.shape[0], q.shape[1]
    K = x.shape[1]
    out = torch.zeros(x.shape[0], N, device=x.device, dtype=torch.float32)
    start = 0
    for e in range(E):
        end = start + counts[e]
        if end > start:
            codes = unpack_int3(q[e]).float()
            w = ((codes.view(N, K // g, g) - zeros[e].float()[..., None]) * scales[e].float()[..., None]).view(N, K)
            xf = x[start:end].float()
            out[start:end] = xf @ w.T + (xf @ v[e].float().T) @ ut[e].float()
        start = end
    return out


def call_poisoned(x, offsets, q, s, z, ut, v, g, **input_kw):
    rows = input_kw["x_rows"].numel() if input_kw.get("x_rows") is not None else x.shape[0]
    poison = torch.full((rows * q.shape[1],), float("nan"), device="cuda", dtype=x.dtype)  # y's size, gated or not
    del poison  # the op's output allocation gets this block back
    return torch.ops.milo.int3_grouped_linear(x, offsets, q, s, z, ut, v, g, **input_kw)


def check(x, counts, offsets, experts, g, tol=TOL, ref_experts=None, **input_kw):
    """input_kw (x_rows, activation, out_activation; ranks, passed to the op alone): the reference multiplies
    the input rows they describe (ref_ops.grouped_input, plain torch on the GPU) while the op reads x itself,
    and gates its output rounded to x's dtype (ref_ops.gate) where the op gates its own. ref_experts: the
    reference's weights where they differ from the op's (padding the op must not read)."""
    out = call_poisoned(x, offsets, *experts, g, **input_kw)
    dtype = x.dtype
    if input_kw.get("x_rows") is not None or input_kw.get("activation", "none") != "none":
        x = ref_ops.grouped_input(x, input_kw.get("x_rows"), input_kw.get("activation", "none"))
    ref = reference(x, counts, *(experts if ref_experts is None else ref_experts), g)
    if input_kw.get("out_activation", "none") != "none":
        ref = ref_ops.gate(ref.to(dtype), input_kw["out_activation"]).float()
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    covered = sum(counts)
    assert covered == 0 or ref.norm() > 0, "the covered rows' reference is zero: the case would pass whatever they hold"
    assert (out[covered:] == 0).all(), "rows past offsets[-1] must be zero"
    err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < tol, f"relative error {err:.3e}"
    return out, err


def random_counts(rnd, E, rows, kind):
    if kind == "one_expert":  # one expert takes every row
        c = [0] * E
        c[rnd.randrange(E)] = rows
        return c
    if kind == "sparse":  # most experts empty
        c = [0] * E
        for _ in range(rows):
            c[rnd.randrange(min(E, 3))] += 1
        rnd.shuffle(c)
        return c
    if kind == "sentinel":  # expert-parallel: some rows belong to no local expert
        used = rnd.randint(0, rows)
        c = [0] * E
        for _ in range(used):
            c[rnd.randrange(E)] += 1
        return c
    c = [0] * E
    for _ in range(rows):
        c[rnd.randrange(E)] += 1
    return c


SHAPES = [  # E, N, K
    (8, 1024, 512), (8, 2048, 1024), (4, 768, 2048), (16, 512, 768), (64, 256, 256), (128, 384, 128),
    (8, 4096, 1024), (3, 1408, 2048), (32, 128, 512),
]
ROWS = [1, 2, 3, 8, 16, 17, 40, 64, 100, 256, 512, 777]
RANKS = [0, 8, 16, 32, 64]
KINDS = ["uniform", "uniform", "one_expert", "sparse", "sentinel"]


def _cases(n, seed):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        E, N, K = rnd.choice(SHAPES)
        rows = rnd.choice(ROWS)
        out.append((E, N, K, rows, rnd.choice(RANKS), rnd.choice([64, 64, 32, 128]),
                    rnd.choice([torch.float16, torch.bfloat16]), rnd.choice(KINDS), i))
    return out


CASES = _cases(120, 4321)


@pytest.mark.parametrize("E,N,K,rows,R,g,dtype,kind,i", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_grouped_random(E, N, K, rows, R, g, dtype, kind, i):
    rnd = random.Random(i)
    gen = torch.Generator(device="cuda").manual_seed(7000 + i)
    ranks = [rnd.choice([0, R // 2, R]) for _ in range(E)] if R else [0] * E
    if R:
        ranks[0] = R
    experts = make_experts(E, N, K, ranks, g, dtype, gen)
    counts = random_counts(rnd, E, rows, kind)
    x = torch.randn(rows, K, device="cuda", generator=gen).to(dtype)
    off_dtype = torch.int64 if i % 5 == 0 else torch.int32
    check(x, counts, routing_offsets(counts, rows, off_dtype), experts, g)


@pytest.mark.parametrize("cfg", ["1", "2", "3", "4", "7", "8"])
@pytest.mark.parametrize("splits", ["0", "1", "3"])
def test_grouped_tile_configs(monkeypatch, cfg, splits):
    """Every tile height and split-K setting on one routing (the host picks them from shapes); 7: tile 7
    (the weight as the mma A operand) with 32-row tiles; 8: tile 8 (warpgroup MMAs), 64-row tiles."""
    skip_unless_tile_runs(cfg)
    monkeypatch.setenv("MILO_INT3_GROUPED_CFG", cfg)
    monkeypatch.setenv("MILO_INT3_SPLITS", splits)
    rnd = random.Random(int(cfg) * 10 + int(splits))
    gen = torch.Generator(device="cuda").manual_seed(int(cfg) * 10 + int(splits))
    E, N, K, rows = 8, 1024, 1024, 150
    experts = make_experts(E, N, K, [32, 0, 16, 32, 8, 32, 0, 4], 64, torch.bfloat16, gen)
    counts = random_counts(rnd, E, rows - 5, "uniform")
    x = torch.randn(rows, K, device="cuda", generator=gen).to(torch.bfloat16)
    check(x, counts, routing_offsets(counts, rows), experts, 64)


@pytest.mark.parametrize("gemv_rows,wk,xblock", [("0", "0", "-1"), ("1000", "0", "-1"), ("1000", "0", "0"),
                                                 ("1000", "1", "-1"), ("1000", "8", "0")])
@pytest.mark.parametrize("rows,g,dtype", [(2, 128, torch.float16), (5, 64, torch.bfloat16), (9, 32, torch.float16),
                                          (40, 64, torch.float16), (150, 64, torch.bfloat16)])
def test_grouped_gemv_and_mma_paths(monkeypatch, gemv_rows, wk, xblock, rows, g, dtype):
    """The decode kernel (tiles of <= 2 rows, 4 past one row per expert: several tiles per expert at 40
    and 150 rows; the 4-row tiles at g >= 64 load each slice's codes one slice ahead) forced on or off,
    with its warps per column tile chosen or forced to 1 and 8 and x staged per warp or once per block,
    for decode and prefill routings, K = 4096 + 1024 (ten 512-k slices), x offset from zero."""
    monkeypatch.setenv("MILO_INT3_GROUPED_GEMV_MAX_ROWS", gemv_rows)
    monkeypatch.setenv("MILO_INT3_GEMV_WK", wk)
    monkeypatch.setenv("MILO_INT3_GEMV_XBLOCK", xblock)
    rnd = random.Random(rows)
    gen = torch.Generator(device="cuda").manual_seed(rows + int(gemv_rows))
    E, N, K = 8, 1000, 4096 + 1024
    experts = make_experts(E, N - 8 * (rows % 2), K, [32, 0, 16, 32, 8, 32, 0, 4], g, dtype, gen)
    counts = random_counts(rnd, E, rows, "uniform")
    x = (torch.randn(rows, K, device="cuda", generator=gen) + 2.0).to(dtype)
    check(x, counts, routing_offsets(counts, rows), experts, g)


@pytest.mark.parametrize("bm", ["1", "2", "4"])
@pytest.mark.parametrize("activation", ["none", "silu_mul"])
@pytest.mark.parametrize("rows,kind", [(6, "uniform"), (40, "uniform"), (40, "one_expert")])
def test_grouped_gemv_tile_height(monkeypatch, bm, activation, rows, kind):
    """The decode kernel's tile height forced (MILO_INT3_GROUPED_GEMV_BM): 2-row tiles past one row per
    busy expert (an expert of 40 rows in 20 tiles) and 4-row tiles at under one, 1-row tiles (the grouped
    op's own 1-row instance; with the activation the rule's height instead), on gathered rows (two outside
    the tokens: zero rows) with and without the activation, K = 1536 (three slices)."""
    monkeypatch.setenv("MILO_INT3_GROUPED_GEMV_BM", bm)
    monkeypatch.setenv("MILO_INT3_GROUPED_GEMV_MAX_ROWS", "1000")
    seed = zlib.crc32(repr((bm, activation, rows, kind)).encode())
    rnd = random.Random(seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    E, N, K, tokens = 8, 520, 1536, 24
    experts = make_experts(E, N, K, [16, 0, 32, 16, 8, 32, 0, 4], 64, torch.bfloat16, gen)
    counts = random_counts(rnd, E, rows - 1, kind)
    x = (torch.randn(tokens, 2 * K if activation == "silu_mul" else K, device="cuda", generator=gen) + 1).to(torch.bfloat16)
    x_rows = torch.randint(0, tokens, (rows,), device="cuda", generator=gen)
    x_rows[1], x_rows[rows - 2] = -1, tokens + 3
    check(x, counts, routing_offsets(counts, rows), experts, 64, x_rows=x_rows, activation=activation)


@pytest.mark.parametrize("wk", ["0", "8"])
@pytest.mark.parametrize("rows,g,dtype", [(1, 64, torch.bfloat16), (3, 128, torch.float16), (6, 32, torch.bfloat16)])
def test_grouped_gemv_spare_warps(monkeypatch, wk, rows, g, dtype):
    """Grids far short of a wave (a few rows, N = 520): the launcher's rule (wk 0) then gives a column
    tile 8 warps though K = 768 has one and a half 512-k slices, so six warps of each tile have no slice;
    forced to 8 as well. Ragged ranks, x offset from zero."""
    monkeypatch.setenv("MILO_INT3_GEMV_WK", wk)
    rnd = random.Random(rows + 7)
    gen = torch.Generator(device="cuda").manual_seed(rows + 70)
    E, N, K = 8, 520, 768
    experts = make_experts(E, N, K, [32, 0, 16, 32, 8, 32, 0, 4], g, dtype, gen)
    counts = random_counts(rnd, E, rows, "uniform")
    x = (torch.randn(rows, K, device="cuda", generator=gen) + 1.0).to(dtype)
    check(x, counts, routing_offsets(counts, rows), experts, g)


@pytest.mark.parametrize("pdl", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["decode", "decode-rows-t", "tensor-core", "tile7", "tile8", "tile9"])
def test_grouped_decode_waits_for_t(monkeypatch, pdl, dtype, kernel):
    """Decode routing (about one row per expert): a t kernel (the tile kernel before the decode kernel, or
    the rows kernel with MILO_INT3_GROUPED_T_TILE=0; the tiled one before the tensor-core kernel), then
    the matmul kernel launched programmatically after it (sm_90), which must wait for t: the t kernel is
    held back 200 us before it writes t (MILO_INT3_TEST_T_DELAY_NS). Ragged ranks up to 32 and K = 2048
    keep the t grid small. With the decode kernel's wait removed (H100, 2026-11-25 10:27 UTC) the decode
    cases failed. Against the reference and bit-equal to the serialized launch."""
    skip_unless_tile_runs(kernel[-1] if kernel in ("tile8", "tile9") else "-")
    monkeypatch.setenv("MILO_INT3_TEST_T_DELAY_NS", "200000")
    monkeypatch.setenv("MILO_INT3_PDL", pdl)
    monkeypatch.setenv("MILO_INT3_GROUPED_T_TILE", "0" if kernel == "decode-rows-t" else "1")
    if not kernel.startswith("decode"):
        monkeypatch.setenv("MILO_INT3_GROUPED_CFG", {"tensor-core": "1", "tile7": "7", "tile8": "8", "tile9": "9"}[kernel])
    rnd = random.Random(17)
    gen = torch.Generator(device="cuda").manual_seed(17 + int(pdl))
    E, N, K, rows = 8, 64, 2048, 6
    experts = make_experts(E, N, K, [32, 0, 20, 32, 8, 32, 0, 4], 64, dtype, gen)
    counts = random_counts(rnd, E, rows, "uniform")
    offsets = routing_offsets(counts, rows)
    x = torch.randn(rows, K, device="cuda", generator=gen).to(dtype)
    out, _ = check(x, counts, offsets, experts, 64)
    monkeypatch.setenv("MILO_INT3_PDL", "0")
    assert torch.equal(out, torch.ops.milo.int3_grouped_linear(x, offsets, *experts, 64))


@pytest.mark.parametrize("gemv_rows,lookup,t_tile", [("1000", "1", "1"), ("1000", "0", "1"), ("1000", "1", "0"),
                                                      ("1000", "0", "0"), ("0", "-1", "1")])
@pytest.mark.parametrize("E,K", [(4, 1536), (16, 1536), (32, 4608)])
@pytest.mark.parametrize("activation", ["none", "silu_mul"])
@pytest.mark.parametrize("rows_dtype", [None, torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_gathered_gated_input(monkeypatch, gemv_rows, lookup, t_tile, E, K, activation, rows_dtype, dtype):
    """Input rows read through x_rows (token indices, two outside the tokens: zero rows) and/or gated
    with silu(gate) * up of [gate | up] rows, on the decode kernel (which reads them itself, with the
    t kernel before it, the tile kernel or the rows kernel; the activation materialized first past K =
    4096), its blocks finding their tiles from the offsets or given a tile list, and on the tensor-core
    path (a materialized input); tiles of 4 rows (E = 4: two per expert; E = 16) and 2 (E = 32); sentinel
    rows at the end."""
    monkeypatch.setenv("MILO_INT3_GROUPED_GEMV_MAX_ROWS", gemv_rows)
    monkeypatch.setenv("MILO_INT3_GROUPED_TILE_LOOKUP", lookup)
    monkeypatch.setenv("MILO_INT3_GROUPED_T_TILE", t_tile)
    seed = zlib.crc32(repr((gemv_rows, lookup, t_tile, E, K, activation, rows_dtype, dtype)).encode())
    rnd = random.Random(seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    N, tokens = 520, 9
    rows = 2 * tokens + 3
    experts = make_experts(E, N, K, [rnd.choice([0, 16, 32]) for _ in range(E)], 64, dtype, gen)
    counts = random_counts(rnd, E, rows - 3, "uniform")
    cols = 2 * K if activation == "silu_mul" else K
    x = (torch.randn(tokens if rows_dtype else rows, cols, device="cuda", generator=gen) * 2).to(dtype)
    kw = {"activation": activation}
    if rows_dtype is not None:
        x_rows = torch.randint(0, tokens, (rows,), device="cuda", generator=gen)
        x_rows[rnd.randrange(rows)], x_rows[rnd.randrange(rows)] = -1, tokens + 3
        kw["x_rows"] = x_rows.to(rows_dtype)
    check(x, counts, routing_offsets(counts, rows), experts, 64, **kw)


@pytest.mark.parametrize("rows,kind", [(12, "uniform"), (40, "sentinel"), (200, "uniform"), (200, "one_expert"),
                                       (700, "uniform"), (700, "sparse")])
@pytest.mark.parametrize("g,dtype", [(64, torch.float16), (128, torch.bfloat16), (32, torch.bfloat16)])
@pytest.mark.parametrize("splits", ["0", "5"])
@pytest.mark.parametrize("cfg", ["7", "8", "9"])
def test_grouped_tile7(monkeypatch, rows, kind, g, dtype, splits, cfg):
    """Tiles 7-9 in the grouped op (MILO_INT3_GROUPED_CFG=7 / 8 / 9): 16-row tiles (12 and 40 rows over 8
    experts), 32-row (200) and 64-row (700; experts of several tiles, the last one partial; tile 8: 64 and
    128 rows; tile 9 as tile 8), one expert taking every row, most experts empty, sentinel rows; ragged ranks (one expert
    with none), N not a multiple of 128, x offset from zero, split-K by the rule and forced to 5 (uneven)."""
    skip_unless_tile_runs(cfg)
    monkeypatch.setenv("MILO_INT3_GROUPED_CFG", cfg)
    monkeypatch.setenv("MILO_INT3_SPLITS", splits)
    seed = zlib.crc32(repr((rows, kind, g, str(dtype), splits, cfg)).encode())
    rnd = random.Random(seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    E, N, K = 8, 648, 1536
    experts = make_experts(E, N, K, [32, 0, 16, 100, 8, 32, 64, 4], g, dtype, gen)
    counts = random_counts(rnd, E, rows, kind)
    x = (torch.randn(rows, K, device="cuda", generator=gen) + 1.0).to(dtype)
    check(x, counts, routing_offsets(counts, rows), experts, g)


@pytest.mark.parametrize("cfg", ["7", "8", "9"])
@pytest.mark.parametrize("activation", ["none", "silu_mul"])
def test_grouped_tile7_gathered_gated_input(monkeypatch, cfg, activation):
    """Tiles 7-9 take the materialized input: rows gathered by x_rows (two outside the tokens: zero
    rows) and gated with silu(gate) * up."""
    skip_unless_tile_runs(cfg)
    monkeypatch.setenv("MILO_INT3_GROUPED_CFG", cfg)
    gen = torch.Generator(device="cuda").manual_seed(31 + len(activation))
    rnd = random.Random(31)
    E, N, K, tokens, rows = 8, 520, 1024, 40, 90
    experts = make_experts(E, N, K, [16, 0, 32, 16, 8, 32, 0, 4], 64, torch.bfloat16, gen)
    counts = random_counts(rnd, E, rows - 2, "uniform")
    x = (torch.randn(tokens, 2 * K if activation == "silu_mul" else K, device="cuda", generator=gen) * 2).to(torch.bfloat16)
    x_rows = torch.randint(0, tokens, (rows,), device="cuda", generator=gen)
    x_rows[3], x_rows[50] = -1, tokens + 3
    check(x, counts, routing_offsets(counts, rows), experts, 64, x_rows=x_rows, activation=activation)


@pytest.mark.parametrize("E,N,K,rows", [(8, 1536, 2048, 1), (8, 1536, 2048, 8), (16, 2816, 1024, 40), (4, 1040, 512, 9),
                                        (8, 1536, 4096, 3)])
@pytest.mark.parametrize("wk", ["0", "1", "8"])
@pytest.mark.parametrize("lookup,lr_mma", [("-1", "1"), ("0", "1"), ("1", "0")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_gated_output(monkeypatch, E, N, K, rows, wk, lookup, lr_mma, dtype):
    """out_activation='silu_mul' (y's [gate | up] halves gated, N / 2 columns), on the decode kernel: from
    its epilogue where a block's columns (128 / warps per tile) divide N and are at least 32, each block taking
    matching gate and up columns (N = 1536, 2816 at wk 0-1: the up column of block column j is N / 2
    further), else y written whole and gated after (wk 8: 16 columns; N = 1040 at any wk); blocks finding
    their tiles from the offsets or given a list (the rows past the last expert zeroed either way, N / 2
    wide); the low-rank term by mma and by the scalar loop (ranks past 64 too); tokens gathered by x_rows,
    one outside them; 1-4 rows per expert (2- and 4-row tiles). Against the float32 reference gated in
    x's dtype, and against the same op's ungated y gated by torch (the same sums: the rounding of one
    silu apart)."""
    monkeypatch.setenv("MILO_INT3_GEMV_WK", wk)
    monkeypatch.setenv("MILO_INT3_GROUPED_TILE_LOOKUP", lookup)
    monkeypatch.setenv("MILO_INT3_GEMV_LR_MMA", lr_mma)
    seed = zlib.crc32(repr((E, N, K, rows, wk, lookup, lr_mma, str(dtype))).encode())
    rnd = random.Random(seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    experts = make_experts(E, N, K, [rnd.choice([0, 16, 32, 100]) for _ in range(E)], 64, dtype, gen)
    tokens = rows + 2
    counts = random_counts(rnd, E, rows - 1 if rows > 1 else rows, "uniform")  # a sentinel row past the experts
    x = (torch.randn(tokens, K, device="cuda", generator=gen) * 2).to(dtype)
    x_rows = torch.randint(0, tokens, (rows,), device="cuda", generator=gen)
    if rows > 1:  # one row outside x (read as zeros); a single row stays a real one, or the case would test nothing
        x_rows[rnd.randrange(rows)] = tokens + 1
    offsets = routing_offsets(counts, rows)
    out, _ = check(x, counts, offsets, experts, 64, x_rows=x_rows, out_activation="silu_mul")
    assert out.shape == (rows, N // 2)
    y = torch.ops.milo.int3_grouped_linear(x, offsets, *experts, 64, x_rows=x_rows)
    torch.testing.assert_close(out, ref_ops.gate(y, "silu_mul"), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("E,N,K,rows,g", [(8, 1536, 2048, 2, 64), (16, 2816, 1024, 8, 128), (8, 1040, 4096, 6, 64),
                                         (8, 1536, 1024, 2, 32)])
@pytest.mark.parametrize("wk", ["0", "1", "8"])
@pytest.mark.parametrize("lookup", ["-1", "0"])
@pytest.mark.parametrize("out_activation", ["none", "silu_mul"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_one_row_tiles(monkeypatch, E, N, K, rows, g, wk, lookup, out_activation, dtype):
    """MILO_INT3_GROUPED_GEMV_BM=1 at one-token decode (each of the token's top-k rows its own expert): the
    grouped op's own 1-row decode instance (classed encoding at g 64 / 128, fixed at 32), its gated output
    from the epilogue where a block's columns divide N (N = 1536, 2816 at wk 0-1) or y written whole and
    gated after (N = 1040; wk 8), blocks finding their tiles from the offsets or given a list; ragged ranks
    given as `ranks` with U's and V's padding made random (the instance runs every expert's term over all R
    ranks: its t is zero past the expert's own), ranks past 64 on the scalar loop. Against the float32
    reference of the clean experts."""
    monkeypatch.setenv("MILO_INT3_GROUPED_GEMV_BM", "1")
    monkeypatch.setenv("MILO_INT3_GEMV_WK", wk)
    monkeypatch.setenv("MILO_INT3_GROUPED_TILE_LOOKUP", lookup)
    seed = zlib.crc32(repr((E, N, K, rows, g, wk, lookup, out_activation, str(dtype))).encode())
    rnd = random.Random(seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ranks = [rnd.choice([0, 16, 33, 64, 100]) for _ in range(E)]
    q, s, z, ut, v = make_experts(E, N, K, ranks, g, dtype, gen)
    ut_j, v_j = junk_padding(ut, v, ranks, gen)
    counts = [0] * E
    for e in rnd.sample(range(E), rows):
        counts[e] = 1
    tokens = 3
    x = (torch.randn(tokens, K, device="cuda", generator=gen) * 2).to(dtype)
    x_rows = torch.randint(0, tokens, (rows,), device="cuda", generator=gen)
    offsets = routing_offsets(counts, rows)
    rk = torch.tensor(ranks, dtype=torch.int32, device="cuda")
    check(x, counts, offsets, (q, s, z, ut_j, v_j), g, tol=(2 if out_activation != "none" else 1) * TOL,
          ref_experts=(q, s, z, ut, v), x_rows=x_rows, ranks=rk, out_activation=out_activation)


@pytest.mark.parametrize("cfg", ["1", "7", "8"])
def test_grouped_gated_output_tensor_core(monkeypatch, cfg):
    """out_activation='silu_mul' past the decode kernel (8 rows per expert; tiles 1-4, 7, 8): y written
    whole, then gated."""
    skip_unless_tile_runs(cfg)
    monkeypatch.setenv("MILO_INT3_GROUPED_CFG", cfg)
    gen = torch.Generator(device="cuda").manual_seed(47 + int(cfg))
    rnd = random.Random(47)
    E, N, K, rows = 8, 1040, 1024, 70
    experts = make_experts(E, N, K, [16, 0, 32, 16, 8, 32, 0, 4], 64, torch.bfloat16, gen)
    counts = random_counts(rnd, E, rows - 2, "uniform")
    x = (torch.randn(rows, K, device="cuda", generator=gen) * 2).to(torch.bfloat16)
    offsets = routing_offsets(counts, rows)
    # silu(gate) * up carries the error of both halves (about 1.4 times y's): tiles 7-8's bf16 y sits near TOL
    out, _ = check(x, counts, offsets, experts, 64, tol=2 * TOL, out_activation="silu_mul")
    assert out.shape == (rows, N // 2)
    y = torch.ops.milo.int3_grouped_linear(x, offsets, *experts, 64)
    torch.testing.assert_close(out, ref_ops.gate(y, "silu_mul"), rtol=1e-2, atol=1e-3)


def junk_padding(ut, v, ranks, gen):
    """ut, v with each expert's rows past its rank (zero padding in a MiLoInt3Tensor) made random: a kernel
    that reads them where the op was given the ranks gets a different result."""
    ut, v = ut.clone(), v.clone()
    for e, r in enumerate(ranks):
        ut[e, r:] = (torch.randn(ut[e, r:].shape, device="cuda", generator=gen) * 0.05).to(ut.dtype)
        v[e, r:] = (torch.randn(v[e, r:].shape, device="cuda", generator=gen) * 0.05).to(v.dtype)
    return ut, v


@pytest.mark.parametrize("E,N,K,rows", [(8, 1536, 2048, 1), (8, 1536, 2048, 8), (16, 2816, 1024, 40), (64, 768, 2048, 30),
                                       (8, 1536, 4096, 24)])
@pytest.mark.parametrize("lookup,lr_mma,t_tile", [("-1", "1", "1"), ("0", "1", "1"), ("1", "0", "1"), ("-1", "1", "0")])
@pytest.mark.parametrize("out_activation", ["none", "silu_mul"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_decode_skips_rank_padding(monkeypatch, E, N, K, rows, lookup, lr_mma, t_tile, out_activation, dtype):
    """ranks=: on the decode path each expert's low-rank term runs over its own ranks: both t kernels (tile,
    MILO_INT3_GROUPED_T_TILE=0: rows) write zeros past them without reading V, and the decode kernel's epilogue
    stops there (mma and scalar loop), except its register-prefetched 4-row instance (K = 4096 at 3 rows per
    expert), which multiplies those zero t by U's padding. Ranks 0 to 100 (the mma term to 64, the scalar loop
    past it), the padding rows of ut and v made random: against the float32 reference of the clean experts,
    while the same call without ranks reads the padding and misses it."""
    monkeypatch.setenv("MILO_INT3_GROUPED_TILE_LOOKUP", lookup)
    monkeypatch.setenv("MILO_INT3_GEMV_LR_MMA", lr_mma)
    monkeypatch.setenv("MILO_INT3_GROUPED_T_TILE", t_tile)
    seed = zlib.crc32(repr((E, N, K, rows, lookup, lr_mma, t_tile, out_activation, str(dtype))).encode())
    rnd = random.Random(seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ranks = [33] + [rnd.choice([0, 5, 16, 33, 64, 100]) for _ in range(E - 2)] + [100]
    q, s, z, ut, v = make_experts(E, N, K, ranks, 64, dtype, gen)
    ut_j, v_j = junk_padding(ut, v, ranks, gen)
    counts = random_counts(rnd, E, rows, "uniform")
    if counts[0] == 0:  # expert 0 (rank 33 of 100) takes a row, so the padding is in the result
        counts[counts.index(max(counts))] -= 1
        counts[0] = 1
    x = (torch.randn(rows, K, device="cuda", generator=gen) * 2).to(dtype)
    offsets = routing_offsets(counts, rows)
    rk = torch.tensor(ranks, dtype=torch.int32, device="cuda")
    out = call_poisoned(x, offsets, q, s, z, ut_j, v_j, 64, ranks=rk, out_activation=out_activation)
    ref = reference(x, counts, q, s, z, ut, v, 64)
    if out_activation != "none":
        ref = ref_ops.gate(ref.to(dtype), out_activation).float()
    assert torch.isfinite(out).all()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < (2 if out_activation != "none" else 1) * TOL, f"relative error {err:.3e}"
    read = torch.ops.milo.int3_grouped_linear(x, offsets, q, s, z, ut_j, v_j, 64, out_activation=out_activation)
    assert ((read.float() - ref).norm() / ref.norm()).item() > 10 * TOL  # the padding would show


@pytest.mark.parametrize("cfg", ["0", "1", "8"])
def test_grouped_ranks_elsewhere(monkeypatch, cfg):
    """Past the decode kernel (tensor-core tiles: 7 by default, 1, 8) the t kernel writes zeros past each
    expert's rank without reading V (whole 64-rank chunks skipped: ranks to 100), and the epilogue multiplies
    them by U^T's padding: with the padding made random, the result is the clean experts' bit for bit; the
    float32 fallback (one int3_linear per expert) takes each expert's own ranks."""
    skip_unless_tile_runs(cfg)
    monkeypatch.setenv("MILO_INT3_GROUPED_CFG", cfg)
    gen = torch.Generator(device="cuda").manual_seed(48)
    E, N, K, rows, ranks = 8, 1040, 1024, 70, [16, 0, 100, 16, 8, 33, 0, 70]
    q, s, z, ut, v = make_experts(E, N, K, ranks, 64, torch.bfloat16, gen)
    ut_j, v_j = junk_padding(ut, v, ranks, gen)
    counts = random_counts(random.Random(48), E, rows, "uniform")
    x = (torch.randn(rows, K, device="cuda", generator=gen) * 2).to(torch.bfloat16)
    offsets = routing_offsets(counts, rows)
    rk = torch.tensor(ranks, dtype=torch.int32, device="cuda")
    out, _ = check(x, counts, offsets, (q, s, z, ut, v), 64, ranks=rk)
    assert torch.equal(out, torch.ops.milo.int3_grouped_linear(x, offsets, q, s, z, ut_j, v_j, 64, ranks=rk))

    q, s, z, ut, v = make_experts(4, 256, 192, [8, 0, 4, 8], 64, torch.float32, gen)
    ut_j, v_j = junk_padding(ut, v, [8, 0, 4, 8], gen)
    counts = [2, 3, 0, 1]
    x = torch.randn(7, 192, device="cuda", generator=gen)
    out = torch.ops.milo.int3_grouped_linear(x, routing_offsets(counts, 7), q, s, z, ut_j, v_j, 64,
                                             ranks=torch.tensor([8, 0, 4, 8], device="cuda"))
    ref = reference(x, counts, q, s, z, ut, v, 64)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def test_grouped_all_empty():
    gen = torch.Generator(device="cuda").manual_seed(3)
    experts = make_experts(4, 256, 256, [8] * 4, 64, torch.float16, gen)
    x = torch.randn(5, 256, device="cuda", generator=gen).half()
    out = call_poisoned(x, routing_offsets([0, 0, 0, 0], 5), *experts, 64)
    assert (out == 0).all()


def test_grouped_matches_dense_kernel():
    """Each expert's rows equal the dense CUDA op on that expert (same math, other tiling)."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    E, N, K = 8, 1408, 2048
    q, s, z, ut, v = make_experts(E, N, K, [16] * E, 64, torch.float16, gen)
    counts = [3, 0, 1, 7, 0, 2, 2, 1]
    x = torch.randn(sum(counts), K, device="cuda", generator=gen).half()
    out = torch.ops.milo.int3_grouped_linear(x, routing_offsets(counts, x.shape[0]), q, s, z, ut, v, 64)
    start = 0
    for e, c in enumerate(counts):
        if c:
            dense = torch.ops.milo.int3_linear(x[start:start + c], q[e], s[e], z[e], ut[e], v[e], 64)
            torch.testing.assert_close(out[start:start + c], dense, rtol=2e-3, atol=2e-3)
        start += c


def test_grouped_fallback_float32():
    """float32 activations are outside the fused kernel: the op still answers right."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    experts = make_experts(4, 256, 192, [8, 0, 4, 8], 64, torch.float32, gen)
    counts = [2, 3, 0, 1]
    x = torch.randn(7, 192, device="cuda", generator=gen)
    check(x, counts, routing_offsets(counts, 7), experts, 64, tol=1e-4)


def test_grouped_cuda_graph_and_compile():
    gen = torch.Generator(device="cuda").manual_seed(21)
    E, N, K, rows = 16, 768, 1024, 24
    q, s, z, ut, v = make_experts(E, N, K, [32] * E, 64, torch.bfloat16, gen)
    static_x = torch.randn(rows, K, device="cuda", generator=gen).bfloat16()
    static_off = routing_offsets(random_counts(random.Random(0), E, rows, "uniform"), rows)

    def f(x, off):
        return torch.ops.milo.int3_grouped_linear(x, off, q, s, z, ut, v, 64)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            f(static_x, static_off)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = f(static_x, static_off)
    rnd = random.Random(1)
    for kind in ["uniform", "one_expert", "sparse", "sentinel"]:  # new routings replay the same graph
        counts = random_counts(rnd, E, rows, kind)
        static_off.copy_(routing_offsets(counts, rows))
        static_x.copy_(torch.randn(rows, K, device="cuda", generator=gen).bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, f(static_x, static_off)), kind
        ref = reference(static_x, counts, q, s, z, ut, v, 64)
        assert ((static_y.float() - ref).norm() / ref.norm()).item() < TOL

    cf = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        out = cf(static_x, static_off)
    assert torch.equal(out, f(static_x, static_off))


# ------------------------------------------------------------------------------------------------
# a quantized MoE model: grouped CUDA path vs the per-expert loop, compiled decode, CUDA graphs
# ------------------------------------------------------------------------------------------------


def _ragged_ranks(info):
    """Routed experts of ranks 0-12 (the grouped op then takes each expert's rank), the rest 16."""
    return 16 if info.kind == "dense" else (0, 4, 8, 12)[info.expert % 4]


def _tiny_quantized(family="mixtral", ranks="uniform", **overrides):
    from models import tiny_moe

    from milo_tensor import DenseSparseRank, milo_int3, quantize_
    from milo_tensor.integrations.experts import _ranks_arg

    # hidden / intermediate multiples of 128 so every expert GEMM takes the fused kernel
    model = tiny_moe(family, **({"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
                                 "num_key_value_heads": 2} | overrides))
    model = model.to(device="cuda", dtype=torch.bfloat16)
    rank_fn = _ragged_ranks if ranks == "ragged" else DenseSparseRank(dense_rank=16, sparse_rank=8)
    quantize_(model, milo_int3(rank_fn, iters=2), progress=False)
    assert model.config._experts_implementation == "milo"
    experts = next(layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    assert (_ranks_arg(experts.gate_up_proj) is None) == (ranks == "uniform")
    return model


def test_model_grouped_equals_expert_loop():
    """The grouped CUDA path vs transformers' per-expert loop over the same quantized experts
    (which dequantizes each expert to bf16 and runs F.linear: other rounding points, so the
    bound is loose at the logits and tight per experts module)."""
    model = _tiny_quantized()
    experts = model.model.layers[1].mlp.experts
    E, H = experts.num_experts, model.config.hidden_size
    gen = torch.Generator(device="cuda").manual_seed(5)
    hs = torch.randn(37, H, device="cuda", generator=gen).bfloat16()
    idx = torch.stack([torch.randperm(E, device="cuda", generator=gen)[:2] for _ in range(37)])
    w = torch.rand(37, 2, device="cuda", generator=gen).bfloat16()
    ids = torch.randint(3, 256, (2, 9), device="cuda")
    with torch.no_grad():
        grouped_mod = experts(hs, idx, w).float()
        grouped = model(ids).logits.float()
        model.set_experts_implementation("eager")
        loop_mod = experts(hs, idx, w).float()
        loop = model(ids).logits.float()
        model.set_experts_implementation("milo")
    assert torch.isfinite(grouped).all() and torch.isfinite(grouped_mod).all()
    assert ((grouped_mod - loop_mod).norm() / loop_mod.norm()).item() < 1e-2
    assert ((grouped - loop).norm() / loop.norm()).item() < 5e-2


@pytest.mark.parametrize("freezing,ranks,fuse", [(False, "uniform", ()), (True, "uniform", ()),
                                                 (False, "ragged", ()), (True, "ragged", ()),
                                                 (True, "uniform", ("routers",)), (True, "ragged", ("qkv",)),
                                                 (False, "uniform", ("routers", "qkv"))])
def test_model_decode_compiled_and_graphed(freezing, ranks, fuse):
    """One decode step (static KV cache) compiled with CUDA graphs equals the eager step, also with
    inductor freezing (README's setting: weights as graph constants, one KV cache reset between
    prompts and still written), with ragged expert ranks (the grouped op's ranks, a graph constant), with
    the routers fused (fuse_router_topk: milo::router_topk's kernel in the graph) and with the attention's
    q/k/v as one stacked weight (fuse_qkv); eager without either."""
    import torch._inductor.config as inductor_config
    from models import decode_step, static_cache_decode_logits
    from transformers import StaticCache

    from milo_tensor import fuse_qkv, fuse_router_topk

    model = _tiny_quantized(ranks=ranks)
    ids = torch.randint(3, 256, (2, 6), device="cuda")
    step = decode_step(model)
    eager = static_cache_decode_logits(model, ids, step)
    if "routers" in fuse:
        assert fuse_router_topk(model) == model.config.num_hidden_layers
    if "qkv" in fuse:
        assert len(fuse_qkv(model)) == model.config.num_hidden_layers
    cache = StaticCache(config=model.config, max_cache_len=32)
    torch._dynamo.reset()
    with inductor_config.patch(freezing=freezing):
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=False)
        static_cache_decode_logits(model, ids, compiled, cache=cache)  # warm-up / record
        graphed = static_cache_decode_logits(model, ids, compiled, cache=cache)
    assert torch.isfinite(graphed).all()
    rel = ((graphed - eager).norm() / eager.norm()).item()
    assert rel < 2e-2, f"compiled decode differs from eager: {rel:.3e}"


@pytest.mark.parametrize("ranks", ["uniform", "ragged"])
def test_experts_module_cuda_graph(ranks):
    """The milo experts forward (sort, grouped gate_up, act, grouped down, combine) captured in a
    CUDA graph replays right for new hidden states and new routings."""
    _experts_module_graph_replays(_tiny_quantized(ranks=ranks).model.layers[0].mlp.experts)


@pytest.mark.parametrize("ranks", ["uniform", "ragged"])
def test_fused_shared_experts_cuda(ranks):
    """fuse_shared_experts on the GPU (DeepSeek-V3-shaped, 2 shared experts as 2 pieces, the routed experts'
    compensators padded to the pieces' rank): the fused model's greedy decode equals the unfused model's
    (bf16: the pieces' outputs are summed in the combine's fp32, the MLP's output was rounded before the add;
    the 12-token prompt runs the MLP itself, past the token bound, the 2-token steps the pieces), a decode
    step compiled with CUDA graphs equals the fused eager step, and the experts module captured in a CUDA
    graph replays right."""
    from models import decode_step, static_cache_decode_logits
    from transformers import StaticCache

    from milo_tensor import fuse_shared_experts

    model = _tiny_quantized("deepseek_v3", ranks=ranks, moe_intermediate_size=128, n_shared_experts=2,
                            num_key_value_heads=4)
    ids = torch.randint(3, 256, (2, 6), device="cuda")
    step = decode_step(model)
    unfused = static_cache_decode_logits(model, ids, step)
    assert fuse_shared_experts(model) == ["model.layers.1.mlp"]
    experts = model.model.layers[1].mlp.experts
    assert experts.milo_shared.count == 2 and 2 <= experts.milo_shared.max_tokens < 12
    fused = static_cache_decode_logits(model, ids, step)
    assert ((fused - unfused).norm() / unfused.norm()).item() < 2e-2
    cache = StaticCache(config=model.config, max_cache_len=32)
    torch._dynamo.reset()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=False)
    static_cache_decode_logits(model, ids, compiled, cache=cache)  # warm-up / record
    graphed = static_cache_decode_logits(model, ids, compiled, cache=cache)
    assert ((graphed - fused).norm() / fused.norm()).item() < 2e-2
    _experts_module_graph_replays(experts)


def _experts_module_graph_replays(experts):
    E, H = experts.num_experts, experts.gate_up_proj.shape[-1]
    tokens, top_k = 5, 2
    gen = torch.Generator(device="cuda").manual_seed(2)
    hs = torch.randn(tokens, H, device="cuda", generator=gen).bfloat16()
    idx = torch.randint(0, E, (tokens, top_k), device="cuda", generator=gen)
    w = torch.rand(tokens, top_k, device="cuda", generator=gen).bfloat16()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            experts(hs, idx, w)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = experts(hs, idx, w)
        for _ in range(3):
            hs.copy_(torch.randn(tokens, H, device="cuda", generator=gen).bfloat16())
            idx.copy_(torch.randint(0, E, (tokens, top_k), device="cuda", generator=gen))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, experts(hs, idx, w))


# ------------------------------------------------------------------------------------------------
# routing glue: milo::moe_route / milo::moe_combine on CUDA against the reference ops on the CPU
# ------------------------------------------------------------------------------------------------

ROUTE_CASES = [  # tokens, top_k, experts: decode, one chunk, several 1024-pair chunks, many experts
    (1, 2, 8), (3, 8, 128), (5, 6, 64), (64, 2, 8), (700, 2, 8), (513, 8, 128), (2000, 6, 64), (40, 4, 1000),
]


def random_expert_ids(gen, tokens, top_k, E, drop, dtype):
    scores = torch.rand(tokens, E, device="cuda", generator=gen)
    ids = scores.topk(top_k, dim=-1).indices
    if drop:
        bad = torch.tensor([E, -1, E + 3], device="cuda")[torch.randint(0, 3, ids.shape, device="cuda", generator=gen)]
        ids = torch.where(torch.rand(ids.shape, device="cuda", generator=gen) < drop, bad, ids)
    return ids.to(dtype)


@pytest.mark.parametrize("tokens,top_k,E", ROUTE_CASES)
@pytest.mark.parametrize("drop", [0.0, 0.3])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_route_cuda_equals_reference(tokens, top_k, E, drop, id_dtype):
    gen = torch.Generator(device="cuda").manual_seed(tokens * 131 + E)
    ids = random_expert_ids(gen, tokens, top_k, E, drop, id_dtype)
    poison = [torch.full((n,), -7, device="cuda", dtype=torch.int32) for n in (ids.numel(), ids.numel(), E)]
    del poison  # the op's outputs get these blocks back
    got = torch.ops.milo.moe_route(ids, E)
    want = ref_ops.moe_route(ids.cpu(), E)
    for g, w in zip(got, want):
        assert g.is_cuda and g.dtype == torch.int32
        assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("tokens,top_k,E,H", [(1, 2, 8, 4096), (7, 8, 128, 2048), (300, 6, 64, 1408), (5, 2, 8, 100)])
@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                          (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)])
def test_combine_cuda_equals_reference(tokens, top_k, E, H, dtype, wdtype):
    gen = torch.Generator(device="cuda").manual_seed(tokens * 7 + H)
    ids = random_expert_ids(gen, tokens, top_k, E, 0.25, torch.int64)
    _, row_of_choice, offsets = torch.ops.milo.moe_route(ids, E)
    out = (torch.randn(tokens * top_k, H, device="cuda", generator=gen) + 0.5).to(dtype)
    weights = torch.rand(tokens, top_k, device="cuda", generator=gen).to(wdtype)
    weights[ids >= E] = float("nan")  # dropped choices: their weight must not leak in
    weights[ids < 0] = float("inf")
    poison = torch.full((tokens * H,), float("nan"), device="cuda", dtype=dtype)
    del poison
    got = torch.ops.milo.moe_combine(out, row_of_choice, weights, offsets)
    want = ref_ops.moe_combine(out.cpu(), row_of_choice.cpu(), weights.cpu(), offsets.cpu())
    assert got.dtype == dtype and got.shape == (tokens, H)
    assert torch.isfinite(got).all(), "unwritten (NaN-poisoned) or leaked dropped-choice outputs"
    # same fp32 sum in the same order: equal up to fma contraction and the final rounding
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol)


def _experts_chain(x, ids, weights, gate_up, down, E):
    """The experts' path as milo_experts_forward runs it, each output's block poisoned beforehand (the
    blocks freed just before the chain: the allocations of the same sizes get them back)."""
    tokens, top_k, inter = ids.shape[0], ids.shape[1], down[0].shape[2] * 32 // 3
    for n, dt in ((tokens * top_k * inter, x.dtype), (tokens * top_k * x.shape[1], x.dtype), (tokens * x.shape[1], x.dtype)):
        poison = torch.full((n,), float("nan"), device="cuda", dtype=dt)
        del poison
    token_of_row, row_of_choice, offsets = torch.ops.milo.moe_route(ids, E)
    h = torch.ops.milo.int3_grouped_linear(x, offsets, *gate_up, 64, x_rows=token_of_row, out_activation="silu_mul")
    out = torch.ops.milo.int3_grouped_linear(h, offsets, *down, 64)
    return torch.ops.milo.moe_combine(out, row_of_choice, weights, offsets)


@pytest.mark.parametrize("chain", ["0", "1"])
@pytest.mark.parametrize("tokens,top_k,E,H,inter", [(1, 8, 16, 2048, 768), (3, 2, 8, 1024, 1536), (4, 6, 12, 2048, 1408)])
def test_decode_chain_waits(monkeypatch, chain, tokens, top_k, E, H, inter):
    """The experts' decode chain (moe_route, gate_up's t and decode kernels, down's, moe_combine), each launched
    programmatically after the kernel before it (MILO_INT3_PDL_CHAIN=1, sm_90), must wait for it: the t kernels
    are held back 200 us before they write t (MILO_INT3_TEST_T_DELAY_NS), so each decode kernel writes its output
    that late while the kernel after it (down's t kernel, moe_combine: the decode kernel lets them launch at its
    start) is already resident; one that read its input before its wait would read the poisoned block.
    Against the reference ops on the same inputs, and bit-equal to serialized launches (MILO_INT3_PDL=0)."""
    gen = torch.Generator(device="cuda").manual_seed(tokens * 1000 + E)
    ranks = [(16, 0, 32, 8)[e % 4] for e in range(E)]
    gate_up = make_experts(E, 2 * inter, H, ranks, 64, torch.bfloat16, gen)
    down = make_experts(E, H, inter, ranks, 64, torch.bfloat16, gen)
    ids = random_expert_ids(gen, tokens, top_k, E, 0.0, torch.int64)
    weights = torch.rand(tokens, top_k, device="cuda", generator=gen)
    x = torch.randn(tokens, H, device="cuda", generator=gen).to(torch.bfloat16)
    monkeypatch.setenv("MILO_INT3_PDL", "0")
    serial = _experts_chain(x, ids, weights, gate_up, down, E)
    monkeypatch.setenv("MILO_INT3_PDL", "1")
    monkeypatch.setenv("MILO_INT3_PDL_CHAIN", chain)
    monkeypatch.setenv("MILO_INT3_TEST_T_DELAY_NS", "200000")
    got = _experts_chain(x, ids, weights, gate_up, down, E)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all(), "a kernel read a poisoned (not yet written) input"
    token_of_row, row_of_choice, offsets = ref_ops.moe_route(ids, E)
    h = ref_ops.int3_grouped_linear(x, offsets, *gate_up, 64, x_rows=token_of_row, out_activation="silu_mul")
    want = ref_ops.moe_combine(ref_ops.int3_grouped_linear(h, offsets, *down, 64), row_of_choice, weights, offsets)
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < 1e-2, f"relative error {err:.3e}"
    assert torch.equal(got, serial)


@pytest.mark.parametrize("tokens,E,H,k", [
    (1, 8, 4096, 2),     # Mixtral-shaped (bf16: 64 KB): a cluster of 8 blocks (sm_90), an expert each
    (3, 10, 1024, 3),    # 10 experts over 3 blocks (bf16: 4, 4, 2)
    (5, 8, 512, 2),      # one block (bf16: 8 KB)
    (16, 16, 4096, 4),   # the fused kernel's most tokens and weight (bf16: 128 KB over 8 blocks)
    (17, 8, 4096, 2),    # cuBLAS's logits, the top-k kernel
    (1, 128, 2048, 8),   # Qwen3-shaped (512 KB): 64 logits-only blocks, then the top-k kernel
    (16, 60, 2048, 4),   # Qwen2-MoE-shaped (240 KB): 30 logits-only blocks a token
    (3, 1000, 64, 32),   # the top-k's most experts and k (bf16: fused, 125 experts a block)
    (2, 1500, 64, 4),    # more experts than threads: torch's ops
    (4, 60, 64, 40),     # k past 32: torch's ops
    (5, 16, 100, 2),     # fp16 / bf16 rows not of whole 16-byte pieces: cuBLAS's logits
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("renormalize", [False, True])
def test_router_topk_cuda(tokens, E, H, k, dtype, renormalize):
    """A top-k router's forward on the GPU (up to 16 tokens one kernel up to 128 KB of weight, else logits-only
    blocks and the top-k kernel; past 16 tokens the top-k kernel after cuBLAS's logits; torch's ops past 1024
    experts or k > 32): logits as x @ W^T (float64) within the dtype's
    rounding; the k largest probabilities of the logits returned (any order among equal ones: 16-bit logits
    tie), descending, their values as torch computes them from those logits; in float32 the same indices as
    torch.topk."""
    gen = torch.Generator(device="cuda").manual_seed(tokens * 1000 + E + k + H)
    x = torch.randn(tokens, H, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(E, H, device="cuda", generator=gen) * (3 / H ** 0.5)).to(dtype)
    logits, w, idx = torch.ops.milo.router_topk(x, weight, k, renormalize)
    assert logits.dtype == dtype and logits.shape == (tokens, E)
    assert w.dtype == torch.float32 and idx.dtype == torch.int64 and w.shape == idx.shape == (tokens, k)
    exact = x.double() @ weight.double().T
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(logits.double(), exact, rtol=tol, atol=tol)
    probs = torch.softmax(logits.double(), dim=-1)
    chosen = probs.gather(-1, idx)
    assert torch.equal(chosen.sort(-1, descending=True).values, probs.topk(k, -1).values), "not the k largest"
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all(), "an expert chosen twice"
    assert (w[:, :-1] >= w[:, 1:]).all(), "not descending"
    _, want_w, want_idx = ref_ops.router_topk(x, weight, k, renormalize)  # torch's ops on the GPU
    p32 = torch.softmax(logits.float(), dim=-1).gather(-1, idx)
    torch.testing.assert_close(w, p32 / p32.sum(-1, keepdim=True) if renormalize else p32, rtol=2e-6, atol=1e-7)
    if dtype == torch.float32:
        assert torch.equal(idx, probs.topk(k, -1).indices)
        torch.testing.assert_close(w, want_w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("E,H,k", [(8, 4096, 2), (128, 2048, 8)])
def test_router_topk_cuda_in_a_graph(E, H, k):
    """The router (the fused kernel's cluster; logits-only blocks and the top-k kernel) captured in a CUDA graph, with
    the chain's programmatic launches, and replayed on new inputs gives the eager result."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(2, H, device="cuda", generator=gen).to(torch.bfloat16)
    weight = (torch.randn(E, H, device="cuda", generator=gen) * H ** -0.5).to(torch.bfloat16)
    torch.ops.milo.router_topk(x, weight, k, True)  # warm-up (first-use checks) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.milo.router_topk(x, weight, k, True)
    x.copy_(torch.randn(2, H, device="cuda", generator=gen).to(torch.bfloat16))
    graph.replay()
    want = torch.ops.milo.router_topk(x, weight, k, True)
    for a, b in zip(out, want):
        assert torch.equal(a, b)


def test_combine_cuda_other_dtypes_fall_back():
    gen = torch.Generator(device="cuda").manual_seed(3)
    ids = random_expert_ids(gen, 4, 2, 8, 0.3, torch.int64)
    _, row_of_choice, offsets = torch.ops.milo.moe_route(ids, 8)
    out = torch.randn(8, 24, device="cuda", generator=gen, dtype=torch.float64)
    weights = torch.rand(4, 2, device="cuda", generator=gen, dtype=torch.float64)
    want = ref_ops.moe_combine(out.cpu(), row_of_choice.cpu(), weights.cpu(), offsets.cpu())
    torch.testing.assert_close(torch.ops.milo.moe_combine(out, row_of_choice, weights, offsets).cpu(), want)


# ------------------------------------------------------------------------------------------------
# compute-sanitizer entry point:  compute-sanitizer python tests/test_moe_cuda.py --sanitize
# ------------------------------------------------------------------------------------------------


def _sanitize_main():
    import os

    assert load_extension(), extension_status()
    worst = 0.0
    cases = [  # E, N, K, rows, R, g, dtype, kind, cfg, splits
        (8, 512, 512, 3, 16, 64, torch.float16, "uniform", "0", "0"),
        (8, 512, 1024, 40, 32, 64, torch.bfloat16, "sentinel", "2", "3"),
        (16, 256, 768, 100, 8, 32, torch.float16, "sparse", "4", "2"),
        (4, 384, 512, 64, 0, 128, torch.bfloat16, "one_expert", "1", "0"),
        (64, 128, 256, 20, 16, 64, torch.float16, "uniform", "0", "5"),
        (8, 512, 4096, 3, 16, 64, torch.bfloat16, "uniform", "0", "0"),  # the decode kernel
        (8, 512, 2048, 48, 16, 64, torch.float16, "uniform", "1", "0"),  # 16-row tiles, 6 rows per expert
        (8, 512, 4608, 20, 16, 128, torch.float16, "uniform", "0", "0"),  # 4-row decode tiles, slices prefetched
        (8, 648, 1024, 200, 32, 64, torch.bfloat16, "sentinel", "7", "3"),  # tile 7, 32-row tiles, split-K
        (8, 520, 512, 700, 16, 32, torch.float16, "uniform", "7", "0"),  # tile 7, 64-row tiles
    ]
    if tile8_runs():  # tiles 8 and 9 (warpgroup MMAs): 64- and 128-row tiles
        cases += [(8, 648, 1024, 300, 32, 64, torch.bfloat16, "sentinel", c, "3") for c in ("8", "9")]
        cases += [(8, 520, 512, 900, 16, 32, torch.float16, "uniform", c, "0") for c in ("8", "9")]
    os.environ["MILO_INT3_GROUPED_GEMV_MAX_ROWS"] = "4"  # the decode kernel up to 4 rows per busy expert
    for n, (E, N, K, rows, R, g, dt, kind, cfg, splits) in enumerate(cases):
        os.environ["MILO_INT3_GROUPED_CFG"] = cfg
        os.environ["MILO_INT3_SPLITS"] = splits
        rnd = random.Random(n)
        gen = torch.Generator(device="cuda").manual_seed(n)
        experts = make_experts(E, N, K, [R] * E, g, dt, gen)
        counts = random_counts(rnd, E, rows, kind)
        x = torch.randn(rows, K, device="cuda", generator=gen).to(dt)
        _, err = check(x, counts, routing_offsets(counts, rows), experts, g)
        worst = max(worst, err)
    for n, (dt, act) in enumerate([(torch.bfloat16, "silu_mul"), (torch.float16, "none")]):  # gathered / gated rows
        gen = torch.Generator(device="cuda").manual_seed(100 + n)
        os.environ["MILO_INT3_GROUPED_CFG"] = "0"
        os.environ["MILO_INT3_GROUPED_TILE_LOOKUP"] = str(n)  # a tile list, then the blocks' own lookup
        os.environ["MILO_INT3_GROUPED_T_TILE"] = str(n)  # the rows t kernel, then the tile t kernel
        experts = make_experts(16, 256, 1024, [16] * 16, 64, dt, gen)
        x = torch.randn(5, 2048 if act == "silu_mul" else 1024, device="cuda", generator=gen).to(dt)
        x_rows = torch.randint(-1, 6, (10,), device="cuda", generator=gen, dtype=torch.int32)
        counts = random_counts(random.Random(n), 16, 9, "uniform")
        _, err = check(x, counts, routing_offsets(counts, 10), experts, 64, x_rows=x_rows, activation=act)
        worst = max(worst, err)
    # the gated output (N = 1040: gated after), with the experts' ranks (their padding skipped)
    for n, (N, lookup) in enumerate([(1536, "1"), (1536, "0"), (1040, "1")]):
        gen = torch.Generator(device="cuda").manual_seed(200 + n)
        os.environ["MILO_INT3_GROUPED_TILE_LOOKUP"] = lookup
        ranks = [16, 0, 32, 16, 100, 8, 16, 16]
        experts = make_experts(8, N, 1024, ranks, 64, torch.bfloat16, gen)
        x = torch.randn(6, 1024, device="cuda", generator=gen).to(torch.bfloat16)
        x_rows = torch.randint(-1, 7, (12,), device="cuda", generator=gen, dtype=torch.int32)
        counts = random_counts(random.Random(n), 8, 11, "uniform")
        _, err = check(x, counts, routing_offsets(counts, 12), experts, 64, x_rows=x_rows, out_activation="silu_mul",
                       ranks=torch.tensor(ranks, dtype=torch.int32, device="cuda"))
        worst = max(worst, err)
    # one-token decode (rows (rows - 1) <= E: the grouped op's 1-row instance by default), its gated epilogue, the
    # experts' ranks with U's and V's padding junk
    gen = torch.Generator(device="cuda").manual_seed(300)
    os.environ["MILO_INT3_GROUPED_TILE_LOOKUP"] = "-1"
    ranks = [16, 0, 33, 64, 100, 8, 16, 16]
    q, s, z, ut, v = make_experts(8, 1536, 2048, ranks, 64, torch.float16, gen)
    ut_j, v_j = junk_padding(ut, v, ranks, gen)
    counts = [0, 0, 1, 0, 0, 1, 0, 0]
    x = torch.randn(1, 2048, device="cuda", generator=gen).to(torch.float16)
    _, err = check(x, counts, routing_offsets(counts, 2), (q, s, z, ut_j, v_j), 64, tol=2 * TOL,
                   ref_experts=(q, s, z, ut, v), x_rows=torch.zeros(2, dtype=torch.int32, device="cuda"),
                   out_activation="silu_mul", ranks=torch.tensor(ranks, dtype=torch.int32, device="cuda"))
    worst = max(worst, err)
    for tokens, top_k, E in [(1, 2, 8), (513, 8, 128), (2000, 6, 64)]:  # the routing kernels
        gen = torch.Generator(device="cuda").manual_seed(tokens)
        ids = random_expert_ids(gen, tokens, top_k, E, 0.3, torch.int64)
        _, row_of_choice, offsets = torch.ops.milo.moe_route(ids, E)
        out = torch.randn(tokens * top_k, 1408, device="cuda", generator=gen).to(torch.bfloat16)
        weights = torch.rand(tokens, top_k, device="cuda", generator=gen)
        torch.ops.milo.moe_combine(out, row_of_choice, weights, offsets)
    for tokens, E, H, k in [(1, 8, 4096, 2), (3, 10, 1024, 3), (5, 8, 512, 2), (16, 16, 4096, 4), (17, 8, 4096, 2),
                            (2, 1000, 64, 32), (1, 128, 2048, 8), (16, 60, 2048, 4)]:  # the router's kernels
        gen = torch.Generator(device="cuda").manual_seed(tokens + E)
        x = torch.randn(tokens, H, device="cuda", generator=gen).to(torch.bfloat16)
        weight = (torch.randn(E, H, device="cuda", generator=gen) * H ** -0.5).to(torch.bfloat16)
        logits, _, _ = torch.ops.milo.router_topk(x, weight, k, True)
        err = ((logits.float() - x.float() @ weight.float().T).norm() / logits.float().norm()).item()
        assert err < 1e-2, f"router logits: relative error {err:.2e}"
    torch.cuda.synchronize()
    print(f"grouped sanitize cases OK ({len(cases) + 14} cases, worst relative error {worst:.2e})")


if __name__ == "__main__":
    import sys

    if "--sanitize" in sys.argv:
        _sanitize_main()
