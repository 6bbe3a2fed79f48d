"""Sharded MiLo weights: FSDP2, tensor parallel (DTensor), expert parallel and DCP checkpoints.

Unit tests of the slicing rule run in this process. The multi-process tests run
tests/distributed_worker.py once (2 ranks, gloo on CPU by default; set MILO_DIST_BACKEND=nccl and
MILO_DIST_DEVICE=cuda for 2 GPUs) and check one scenario each; its docstring says which scenarios
are compared bit for bit and which within float32 tolerance, and why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers

from milo_tensor import MiLoInt3Tensor
from milo_tensor.integrations import distributed as D
from milo_tensor.quant.packing import pack_int3, pack_int3_v1, unpack_int3
from test_tensor import random_parts

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
BACKEND = os.environ.get("MILO_DIST_BACKEND", "gloo")
DEVICE = os.environ.get("MILO_DIST_DEVICE", "cpu")


# ---------------------------------------------------------------------- the slicing rule, one process


def _with_int3_compensator(w: MiLoInt3Tensor, gen, comp_group_size=32) -> MiLoInt3Tensor:
    """``w`` with its compensator replaced by int3 codes (packed along N for U^T, along K for V)."""
    lead = w.qdata.shape[:-2]
    r, n, k = w.ut.shape[-2], w.shape[-2], w.shape[-1]

    def part(length):
        codes = torch.randint(0, 8, (*lead, r, length), generator=gen, dtype=torch.uint8)
        scales = torch.rand((*lead, r, length // comp_group_size), generator=gen) * 0.01
        zeros = torch.rand((*lead, r, length // comp_group_size), generator=gen) * 7
        return pack_int3(codes), scales, zeros

    (ut, uts, utz), (v, vs, vz) = part(n), part(k)
    return w._with(ut=ut, v=v, ut_scales=uts, ut_zeros=utz, v_scales=vs, v_zeros=vz,
                   comp_bits=3, comp_group_size=comp_group_size)


@pytest.mark.parametrize("experts", [None, 4])
@pytest.mark.parametrize("compensator", ["float", "int3"])
def test_split_matches_dense_slices(gen, experts, compensator):
    ranks = (8,) if experts is None else (4, 0, 8, 2)
    w, _ = random_parts(gen, 96 if compensator == "float" else 128, 128, ranks, experts=experts, group_size=32)
    if compensator == "int3":
        w = _with_int3_compensator(w, gen)
    dense = w.dequantize()
    for dim in range(w.ndim):
        for pieces in (2, 4):
            parts = torch.chunk(w, pieces, dim=dim)
            for part, expected in zip(parts, torch.chunk(dense, pieces, dim=dim)):
                assert isinstance(part, MiLoInt3Tensor) and part.shape == expected.shape
                torch.testing.assert_close(part.dequantize(), expected, rtol=0, atol=1e-6)
            if experts is not None and dim == 0:
                step = len(ranks) // pieces
                assert [p.ranks for p in parts] == [ranks[i * step:(i + 1) * step] for i in range(pieces)]
            whole = torch.cat(parts, dim=dim)
            assert whole.ranks == w.ranks
            for name in w.__tensor_flatten__()[0]:
                assert torch.equal(getattr(whole, name), getattr(w, name)), (dim, pieces, name)


def test_rowwise_partials_sum_to_full_output(gen):
    """x @ W.T = sum_k x_k @ W_k.T with each rank's x_k @ deq(Q_k).T + (x_k @ V_k.T) @ U.T."""
    w, _ = random_parts(gen, 96, 256, (16,), group_size=64)
    x = torch.randn(5, 256, generator=gen)
    full = F.linear(x, w)
    for pieces in (2, 4):
        parts = torch.chunk(w, pieces, dim=1)
        assert all(torch.equal(p.ut, w.ut) for p in parts)  # U is whole on every rank
        partial = sum(F.linear(xk, wk) for xk, wk in zip(x.chunk(pieces, dim=-1), parts))
        torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-5)
        colwise = torch.cat([F.linear(x, wn) for wn in torch.chunk(w, pieces, dim=0)], dim=-1)
        torch.testing.assert_close(colwise, full, rtol=1e-6, atol=1e-6)


def test_split_that_cuts_a_group_or_word_is_refused(gen):
    w, _ = random_parts(gen, 64, 128, (4,), group_size=64)
    with pytest.raises(ValueError, match=r"shape \(64, 128\).*group_size=64.*multiple of 64"):
        torch.chunk(w, 4, dim=1)  # 32 columns: half a group
    with pytest.raises(ValueError, match="group_size=64"):
        w[:, 16:80]  # a slice that starts inside a packed word
    assert w[:, 64:].shape == (64, 64)  # whole groups are fine
    wq = _with_int3_compensator(w, gen, comp_group_size=64)
    with pytest.raises(ValueError, match="compensator"):
        torch.chunk(wq, 2, dim=0)  # U^T is packed and grouped along N in groups of 64


def test_cat_of_unrelated_weights_and_uneven_fsdp_are_refused(gen):
    a, _ = random_parts(gen, 64, 64, (4,), group_size=32)
    b, _ = random_parts(gen, 64, 64, (4,), group_size=32)
    with pytest.raises(NotImplementedError, match="different 'v' factors"):
        D.cat([a, b], dim=0)  # rows of two weights with different V are not one MiLo weight
    stack, _ = random_parts(gen, 64, 64, (4, 2, 0), experts=3, group_size=32)
    module = torch.nn.Module()
    module.experts = torch.nn.Parameter(stack, requires_grad=False)
    with pytest.raises(ValueError, match=r"experts \(3, 64, 64\)"):
        D.check_fsdp_shardable(module, 2)
    D.check_fsdp_shardable(module, 3)


def test_fsdp_padding_ops_keep_ranks(gen):
    """FSDP2's shard preparation (chunk, new_zeros, narrow, copy_, view) keeps every expert's rank."""
    w, _ = random_parts(gen, 64, 64, (4, 0, 8, 2), experts=4, group_size=32)
    chunk = torch.chunk(w, 2, dim=0)[1]
    padded = w.new_zeros((2, 64, 64))
    assert padded.ranks == (0, 0) and padded.ut.shape == (2, 8, 64)
    padded.narrow(0, 0, 2).copy_(chunk)
    assert padded.ranks == (8, 2)
    assert torch.equal(padded.dequantize(), w.dequantize()[2:])
    assert padded.narrow(dim=0, start=0, length=2) is padded
    assert padded.view(-1).shape == (2 * 64 * 64,)
    with pytest.raises(ValueError, match="metadata mismatch"):
        padded.copy_(w)


class _OldFormatCheckpointable(D.MiLoCheckpointable):
    """Saves ``format_version`` ``version``; for 1 what a format-1 milo_tensor saved: int3 words in the
    format-1 layout (``qdata``, and ``ut`` / ``v`` of an int3 compensator)."""

    def __init__(self, model, version=1):
        super().__init__(model)
        self.version = version

    def state_dict(self):
        sd = super().state_dict()
        for key in [k for k in sd if k.endswith("._milo")]:
            fqn = key.removesuffix("._milo")
            sd[key] = {**sd[key], "format_version": self.version}
            for leaf in ("qdata", "ut", "v") if sd[key]["comp_bits"] == 3 else ("qdata",):
                if self.version == 1:
                    sd[f"{fqn}.{leaf}"] = pack_int3_v1(unpack_int3(sd[f"{fqn}.{leaf}"]))
        return sd


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("comp_bits", [None, 3])
def test_dcp_format_1_checkpoint_is_repacked_at_load(tmp_path, gen, comp_bits):
    """A single-process DCP checkpoint of format 1 loads (repacked in place) as the weights saved."""
    import torch.distributed.checkpoint as dcp

    from milo_tensor import CheckpointError, milo_int3, quantize_

    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64, bias=False))
        extra = dict(compensator_bits=3, compensator_group_size=32) if comp_bits == 3 else {}
        quantize_(model, milo_int3(8, iters=0, quantizer="rtn", **extra), progress=False)
        return model

    model = build(0)
    dcp.save({"model": _OldFormatCheckpointable(model)}, checkpoint_id=tmp_path / "v1")
    target = build(1)
    assert not torch.equal(target[0].weight.qdata, model[0].weight.qdata)
    D.load_sharded(target, tmp_path / "v1")
    for a, b in ((model[0].weight, target[0].weight), (model[2].weight, target[2].weight)):
        assert b.comp_bits == comp_bits
        for name in a.__tensor_flatten__()[0]:
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    x = torch.randn(5, 64, generator=gen)
    with torch.no_grad():
        assert torch.equal(target(x), model(x))
    # a version this milo_tensor does not know is refused
    dcp.save({"model": _OldFormatCheckpointable(model, version=3)}, checkpoint_id=tmp_path / "v3")
    with pytest.raises(CheckpointError, match=r"0.weight: unknown MiLo format version 3 \(this milo_tensor reads \[1, 2\]\)"):
        D.load_sharded(build(2), tmp_path / "v3")


# ---------------------------------------------------------------------- two ranks

SCENARIO_OF = {
    "test_fsdp2_forward_bitwise": "fsdp_forward",
    "test_fsdp2_int3_compensator_bitwise": "fsdp_quantized_compensator",
    "test_fsdp2_uneven_split_is_refused": "fsdp_refuses_uneven",
    "test_fsdp2_compiled_forward": "fsdp_compile",
    "test_tp_dtensor_colwise_rowwise": "tp_dtensor",
    "test_tp_transformers_plan_with_quantized_experts": "tp_transformers_plan",
    "test_tp_split_cutting_a_group_is_refused": "tp_refuses_group_split",
    "test_tp_compiled_forward": "tp_compile",
    "test_ep_transformers_plan_bitwise": "ep_transformers_plan",
    "test_dcp_round_trip_bitwise": "dcp_round_trip",
}


@pytest.fixture(scope="module")
def dist_results(request, tmp_path_factory):
    if not dist.is_available() or (BACKEND == "gloo" and not dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    if DEVICE == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("MILO_DIST_DEVICE=cuda needs 2 GPUs")
    selected = {SCENARIO_OF[item.originalname] for item in request.session.items
                if item.module is request.module and getattr(item, "originalname", None) in SCENARIO_OF}
    names = [n for n in dict.fromkeys(SCENARIO_OF.values()) if n in selected]
    if "dcp_round_trip" in names:
        names.insert(0, names.pop(names.index("dcp_round_trip")))  # before the slow compile scenarios
    out = tmp_path_factory.mktemp("milo_dist")
    cmd = [sys.executable, str(WORKER), "--backend", BACKEND, "--device", DEVICE, "--out", str(out),
           "--only", ",".join(names)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    path = out / "results.json"
    if not path.exists():
        pytest.fail(f"{' '.join(cmd)} wrote no results (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(path.read_text())


def _check(results, scenario):
    res = results.get(scenario)
    assert res is not None, f"scenario {scenario} did not run"
    assert res["ok"], res["error"]
    return res.get("info", {})


def test_fsdp2_forward_bitwise(dist_results):
    """fully_shard per decoder layer + root: each rank holds half the experts (with their ranks) and
    half the rows of every 2D weight; the forward (and transformers' eager experts loop, which reads
    the per-expert ranks) equals the single-process quantized model bit for bit."""
    info = _check(dist_results, "fsdp_forward")
    assert info["sharded_milo_bytes"] < 0.6 * info["unsharded_milo_bytes"]


def test_fsdp2_int3_compensator_bitwise(dist_results):
    _check(dist_results, "fsdp_quantized_compensator")


def test_fsdp2_uneven_split_is_refused(dist_results):
    info = _check(dist_results, "fsdp_refuses_uneven")
    assert "(3, 64, 64)" in info["forward_3d"] and "(33, 64)" in info["forward_2d"]


def test_fsdp2_compiled_forward(dist_results):
    """torch.compile of the FSDP2 model: within float32 tolerance of eager (inductor reorders)."""
    _check(dist_results, "fsdp_compile")


def test_tp_dtensor_colwise_rowwise(dist_results):
    """torch's ColwiseParallel / RowwiseParallel on the attention projections (DTensor dispatch on the
    MiLo shards, rank 0 scattering them): float32 tolerance (the row-wise all-reduce reorders the sum)."""
    _check(dist_results, "tp_dtensor")


def test_tp_transformers_plan_with_quantized_experts(dist_results):
    """transformers' own tp_plan on a model with float and with int3 compensators. Up to 5.24 it
    splits the experts (packed_colwise gate_up, rowwise down, moe_tp_experts); 5.25 keeps them whole
    (experts go to EP), and shard_experts=True adds those entries back."""
    info = _check(dist_results, "tp_transformers_plan")
    tf_version = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    assert info["a, shard_experts=False"]["experts_sharded"] == (tf_version < (5, 25))
    assert info["a, shard_experts=True"]["experts_sharded"] and info["b, shard_experts=True"]["experts_sharded"]


def test_tp_split_cutting_a_group_is_refused(dist_results):
    info = _check(dist_results, "tp_refuses_group_split")
    assert "group_size=64" in info["distribute_tensor"] and "proj.weight" in info["plan"]


def test_tp_compiled_forward(dist_results):
    _check(dist_results, "tp_compile")


def test_ep_transformers_plan_bitwise(dist_results):
    """transformers' own ep_plan: 2 whole experts per rank, routed tokens, all-reduce: bit for bit."""
    _check(dist_results, "ep_transformers_plan")


def test_dcp_round_trip_bitwise(dist_results):
    """DCP save of the FSDP2-sharded model; load into FSDP2, TP and EP models of other weights and
    into a single-process model: every inner tensor and rank equals the original bit for bit."""
    info = _check(dist_results, "dcp_round_trip")
    assert info["milo_weights_checked"] == {"fsdp": 12, "tp": 12, "ep": 12}
    assert _check(dist_results, "dcp_single_process_load")["milo_weights_checked"] == 12
