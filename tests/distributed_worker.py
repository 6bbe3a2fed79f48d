"""Two-rank checks of sharded MiLo weights: FSDP2, tensor parallel, expert parallel, DCP checkpoints.

tests/test_distributed.py runs this on CPU (gloo) and reads its results; it also runs by itself, e.g.
on two GPUs:

    python tests/distributed_worker.py                                  # gloo, CPU, 2 processes
    python tests/distributed_worker.py --backend nccl --device cuda     # NCCL, 2 GPUs
    python tests/distributed_worker.py --only fsdp_forward,dcp_round_trip

The launcher quantizes the tiny MoE models once (the single-process reference: its logits, its
weights), pickles them, starts 2 ranks on 127.0.0.1 (a free port) that load the same models, shard
them and compare with the reference, then loads the ranks' DCP checkpoint back into a
single-process model. Every scenario asserts numbers (not only "it ran"), so a wrong slice, a wrong
all-gather order or lost ranks fails it. Results go to <out>/results.json; the exit code is 0 only
if every scenario passed.

Equality: FSDP2 and expert parallel are compared bit for bit (the all-gathered weight is the
reference weight, and expert parallel adds exact zeros for other ranks' experts). Tensor parallel
is compared within float32 tolerance: a row-wise (K) split sums two partial matmuls with an
all-reduce, a different summation order than one matmul over K. torch.compile'd forwards are
compared within float32 tolerance to the eager reference (inductor fuses and reorders float ops).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import tiny_moe  # noqa: E402

WORLD = 2
RTOL = ATOL = 1e-5  # float32 reduction order (tensor parallel, compile)


# ---------------------------------------------------------------------- models (launcher side)


def _ragged_ranks(info):
    """Experts get different ranks (2, 4, 6, 8: the 'mixture' of compensators), dense weights 8."""
    return 2 * (info.expert + 1) if info.kind == "expert" else 8


def _quantized(seed: int, rank_fn, layers: int = 2, **config):
    from milo_tensor import milo_int3, quantize_

    # head_dim 32: k_proj's N=64 splits into 32s, whole groups of a quantized compensator
    model = tiny_moe("qwen3_moe", seed=seed, head_dim=32, num_hidden_layers=layers)
    quantize_(model, milo_int3(rank_fn, group_size=32, iters=1, quantizer="rtn", compensator_group_size=32, **config),
              progress=False)  # the sharding does not depend on how the codes were chosen: keep it fast
    return model


def _logits(model, ids, impl: str | None = None):
    """Logits; ``impl`` switches the experts implementation for this call (through the shared config:
    ``set_experts_implementation`` refuses FSDP2's wrapper class, whose module lacks transformers' marker)."""
    before = model.config._experts_implementation
    if impl is not None:
        model.config._experts_implementation = impl
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        model.config._experts_implementation = before


def prepare(out: Path, device: str) -> None:
    dev = torch.device("cuda:0" if device == "cuda" else "cpu")
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(7))
    a = _quantized(0, _ragged_ranks)              # float compensator, ragged expert ranks
    b = _quantized(0, _ragged_ranks, compensator_bits=3)  # int3-packed compensator
    other = _quantized(1, 8)                      # other weights, constant ranks, same layout as `a`
    c = _quantized(2, _ragged_ranks, layers=1)    # one decoder layer: the compile checks, faster to compile
    refs = {}
    torch.set_num_threads(1)  # as on the ranks: a CPU matmul's summation order depends on the thread count
    for name, model in (("a", a), ("b", b), ("c", c)):
        m = copy.deepcopy(model).to(dev)
        refs[name] = _logits(m, ids.to(dev)).cpu()
        refs[name + "_eager"] = _logits(m, ids.to(dev), "eager").cpu()
    torch.save({"a": a, "b": b, "c": c, "other": other, "ids": ids, "refs": refs}, out / "models.pt")


# ---------------------------------------------------------------------- helpers (rank side)


class Ctx:
    def __init__(self, rank: int, device: str, out: Path):
        self.rank = rank
        self.device = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
        self.device_type = "cuda" if device == "cuda" else "cpu"
        self.out = out
        data = torch.load(out / "models.pt", weights_only=False)
        self.models = {k: data[k] for k in ("a", "b", "c", "other")}
        self.ids = data["ids"].to(self.device)
        self.refs = {k: v.to(self.device) for k, v in data["refs"].items()}
        self._mesh = None

    def model(self, name: str):
        return copy.deepcopy(self.models[name]).to(self.device)

    @property
    def mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device_type, (WORLD,))
        return self._mesh


def assert_equal(out, ref, what: str) -> None:
    if not torch.equal(out, ref):
        diff = (out.double() - ref.double()).abs().max().item() if out.shape == ref.shape else "shape"
        raise AssertionError(f"{what}: not bitwise equal to the single-process model (max |diff| = {diff})")


def assert_close(out, ref, what: str) -> None:
    try:
        torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    except AssertionError as err:
        raise AssertionError(f"{what}: {err}") from None


def _local(t):
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _dense(w):
    """A MiLo weight's dense value, computed on the CPU (as the reference's), so GPU shards compare bitwise."""
    return w.to("cpu").dequantize()


def _fully_shard(model, mesh, **kwargs):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def _expect_error(fn, exc_type, *needles):
    try:
        fn()
    except exc_type as err:
        for needle in needles:
            if needle not in str(err):
                raise AssertionError(f"the error does not name {needle!r}: {err}") from None
        return str(err)
    raise AssertionError(f"expected {exc_type.__name__} naming {needles}, nothing was raised")


def _random_milo(shape, ranks, group_size, device, seed=0):
    """A MiLo weight from random parts (refusal checks need no quantization)."""
    from milo_tensor import MiLoInt3Tensor
    from milo_tensor.quant.packing import pack_int3

    g = torch.Generator().manual_seed(seed)
    *lead, n, k = shape
    r = max(ranks)
    codes = torch.randint(0, 8, (*lead, n, k), generator=g, dtype=torch.uint8)
    scales = torch.rand((*lead, n, k // group_size), generator=g) * 0.02 + 0.005
    zeros = torch.rand((*lead, n, k // group_size), generator=g) * 7
    ut, v = torch.randn((*lead, r, n), generator=g) * 0.05, torch.randn((*lead, r, k), generator=g) * 0.05
    w = MiLoInt3Tensor(pack_int3(codes), scales, zeros, ut, v, tuple(shape), group_size, ranks)
    return w.to(device)


# ---------------------------------------------------------------------- scenarios


def fsdp_forward(ctx: Ctx) -> dict:
    """fully_shard each decoder layer and the root; every rank holds half of every MiLo weight."""
    ref_model = ctx.models["a"]
    model = _fully_shard(ctx.model("a"), ctx.mesh)
    r = ctx.rank
    # what this rank holds: experts 2r, 2r+1 (with their own ranks), rows r*N/2.. of a 2D weight
    full = ref_model.model.layers[0].mlp.experts.gate_up_proj
    shard = _local(model.model.layers[0].mlp.experts.gate_up_proj)
    if shard.ranks != full.ranks[2 * r: 2 * r + 2]:
        raise AssertionError(f"expert shard ranks {shard.ranks} != {full.ranks[2 * r: 2 * r + 2]}")
    for name in ("qdata", "scales", "zeros", "ut", "v"):
        assert_equal(getattr(shard, name).cpu(), getattr(full, name)[2 * r: 2 * r + 2], f"gate_up_proj.{name} shard")
    q_full = ref_model.model.layers[0].self_attn.q_proj.weight
    q = _local(model.model.layers[0].self_attn.q_proj.weight)
    n = q_full.shape[0] // WORLD
    assert_equal(q.qdata.cpu(), q_full.qdata[r * n:(r + 1) * n], "q_proj.qdata shard")
    assert_equal(q.ut.cpu(), q_full.ut[:, r * n:(r + 1) * n], "q_proj.ut shard (columns of U^T)")
    assert_equal(q.v.cpu(), q_full.v, "q_proj.v (kept whole)")
    out = _logits(model, ctx.ids)
    assert_equal(out, ctx.refs["a"], "FSDP2 forward")
    assert_equal(_logits(model, ctx.ids), ctx.refs["a"], "FSDP2 second forward (all-gather into the same buffers)")
    # transformers' eager experts loop slices each expert's compensator to its rank: the unsharded
    # weight must carry every expert's rank, gathered from both ranks
    assert_equal(_logits(model, ctx.ids, "eager"), ctx.refs["a_eager"], "FSDP2 forward, eager experts (per-expert ranks)")
    sharded = sum(_local(p).storage_nbytes() for p in model.parameters() if hasattr(_local(p), "storage_nbytes"))
    whole = sum(p.storage_nbytes() for p in ref_model.parameters() if hasattr(p, "storage_nbytes"))
    return {"sharded_milo_bytes": sharded, "unsharded_milo_bytes": whole}


def fsdp_quantized_compensator(ctx: Ctx) -> dict:
    """The int3-packed compensator (U^T packed along N, V along K) all-gathers too."""
    model = _fully_shard(ctx.model("b"), ctx.mesh)
    assert_equal(_logits(model, ctx.ids), ctx.refs["b"], "FSDP2 forward, int3 compensator")
    assert_equal(_logits(model, ctx.ids, "eager"), ctx.refs["b_eager"], "FSDP2 forward, int3 compensator, eager experts")
    return {}


def fsdp_refuses_uneven(ctx: Ctx) -> dict:
    """3 experts (or 33 output rows) over 2 ranks: refused on every rank, naming the shape."""
    from torch.distributed.fsdp import fully_shard

    from milo_tensor.integrations.distributed import check_fsdp_shardable

    errors = {}
    experts = torch.nn.Module()
    experts.w = torch.nn.Parameter(_random_milo((3, 64, 64), (2, 4, 8), 32, ctx.device), requires_grad=False)
    experts.forward = lambda x: torch.nn.functional.linear(x, experts.w[0])
    errors["check"] = _expect_error(lambda: check_fsdp_shardable(experts, WORLD), ValueError, "(3, 64, 64)")
    fully_shard(experts, mesh=ctx.mesh)
    x = torch.randn(2, 64, device=ctx.device)
    errors["forward_3d"] = _expect_error(lambda: experts(x), ValueError, "(3, 64, 64)", "not divisible")
    lin = torch.nn.Linear(64, 33, bias=False)
    lin.weight = torch.nn.Parameter(_random_milo((33, 64), (8,), 32, ctx.device), requires_grad=False)
    fully_shard(lin, mesh=ctx.mesh)
    errors["forward_2d"] = _expect_error(lambda: lin(x), ValueError, "(33, 64)", "not divisible")
    return errors


def fsdp_compile(ctx: Ctx) -> dict:
    model = _fully_shard(ctx.model("c"), ctx.mesh)
    compiled = torch.compile(model)
    with torch.no_grad():
        out = compiled(ctx.ids).logits
        out2 = compiled(ctx.ids).logits
    assert_close(out, ctx.refs["c"], "torch.compile(FSDP2 model)")
    assert_equal(out2, out, "torch.compile(FSDP2 model), second call")
    return {}


def _torch_tp(model, mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
            "o_proj": RowwiseParallel()}
    for layer in model.model.layers:
        parallelize_module(layer.self_attn, mesh, plan)  # default src_data_rank=0: rank 0 scatters the shards
    return model


def tp_dtensor(ctx: Ctx) -> dict:
    """torch's ColwiseParallel / RowwiseParallel (DTensor ops on the MiLo shards) on the attention."""
    ref_model = ctx.models["a"]
    model = _torch_tp(ctx.model("a"), ctx.mesh)
    r = ctx.rank
    q_full, o_full = (getattr(ref_model.model.layers[0].self_attn, n).weight for n in ("q_proj", "o_proj"))
    q, o = (_local(getattr(model.model.layers[0].self_attn, n).weight) for n in ("q_proj", "o_proj"))
    n, k = q_full.shape[0] // WORLD, o_full.shape[1] // WORLD
    assert_equal(q.qdata.cpu(), q_full.qdata[r * n:(r + 1) * n], "colwise q_proj.qdata rows")
    assert_equal(q.ut.cpu(), q_full.ut[:, r * n:(r + 1) * n], "colwise q_proj.ut columns")
    words = k * 3 // 32
    assert_equal(o.qdata.cpu(), o_full.qdata[:, r * words:(r + 1) * words], "rowwise o_proj.qdata words")
    assert_equal(o.scales.cpu(), o_full.scales[:, r * k // 32:(r + 1) * k // 32], "rowwise o_proj.scales groups")
    assert_equal(o.v.cpu(), o_full.v[:, r * k:(r + 1) * k], "rowwise o_proj.v columns")
    assert_equal(o.ut.cpu(), o_full.ut, "rowwise o_proj.ut (kept whole)")
    assert_close(_logits(model, ctx.ids), ctx.refs["a"], "TP (DTensor colwise/rowwise) forward")
    return {}


def _check_packed_colwise(ref_w, shard, rank):
    """transformers' packed_colwise: each rank holds its slice of the gate half and of the up half."""
    full = ref_w.dequantize()
    half = full.shape[1] // 2
    n = half // WORLD
    expected = torch.cat([full[:, rank * n:(rank + 1) * n], full[:, half + rank * n: half + (rank + 1) * n]], dim=1)
    assert_equal(_dense(shard), expected, "packed_colwise gate_up shard")


def _check_experts(ref_experts, experts, rank, sharded: bool) -> None:
    gate_up, down = _local(experts.gate_up_proj), _local(experts.down_proj)
    down_full = ref_experts.down_proj.dequantize()
    if not sharded:
        assert_equal(_dense(gate_up), ref_experts.gate_up_proj.dequantize(), "gate_up_proj kept whole")
        assert_equal(_dense(down), down_full, "down_proj kept whole")
        return
    _check_packed_colwise(ref_experts.gate_up_proj, gate_up, rank)
    k = down_full.shape[-1] // WORLD
    assert_equal(_dense(down), down_full[..., rank * k:(rank + 1) * k], "rowwise down_proj shard")


def tp_transformers_plan(ctx: Ctx) -> dict:
    """transformers' own TP plan (model.tp_plan) on the quantized model; with shard_experts=True the
    quantized experts are split too (the plan of transformers <= 5.24, which 5.25 dropped)."""
    from milo_tensor.integrations.distributed import apply_tensor_parallel, tensor_parallel_plan

    info = {}
    for name, shard_experts in (("a", False), ("a", True), ("b", True)):
        model = ctx.model(name)
        plan = tensor_parallel_plan(model, shard_experts=shard_experts)
        in_plan = "model.layers.0.mlp.experts.gate_up_proj" in plan
        if shard_experts and not in_plan:
            raise AssertionError(f"shard_experts=True left the experts out of the plan: {sorted(plan)}")
        model = apply_tensor_parallel(model, ctx.mesh, plan)
        _check_experts(ctx.models[name].model.layers[0].mlp.experts, model.model.layers[0].mlp.experts, ctx.rank, in_plan)
        assert_close(_logits(model, ctx.ids), ctx.refs[name],
                     f"TP (transformers plan, shard_experts={shard_experts}) forward, model {name}")
        info[f"{name}, shard_experts={shard_experts}"] = {"experts_sharded": in_plan, "plan_entries": len(plan)}
    return info


def tp_refuses_group_split(ctx: Ctx) -> dict:
    """A K split that cuts a quantization group (or a compensator group) is refused before sharding."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from milo_tensor.integrations.distributed import apply_tensor_parallel

    errors = {}
    w = _random_milo((64, 64), (8,), 64, ctx.device)
    errors["distribute_tensor"] = _expect_error(
        lambda: distribute_tensor(w, ctx.mesh, [Shard(1)], src_data_rank=None), ValueError, "(64, 64)", "group_size=64")
    module = torch.nn.Module()
    module.proj = torch.nn.Linear(64, 64, bias=False)
    module.proj.weight = torch.nn.Parameter(w, requires_grad=False)
    errors["plan"] = _expect_error(lambda: apply_tensor_parallel(module, ctx.mesh, {"proj.weight": "rowwise", "proj": "rowwise"}),
                                   ValueError, "(64, 64)", "group_size=64", "proj.weight")
    from torch.distributed.tensor import DTensor

    if isinstance(module.proj.weight, DTensor):
        raise AssertionError("the refused plan modified the module")
    # a quantized compensator is stored in groups along N too: a colwise split must not cut them
    ut_codes = torch.randint(0, 8, (8, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    from milo_tensor.quant.packing import pack_int3

    wq = w._with(ut=pack_int3(ut_codes).to(ctx.device), ut_scales=torch.rand(8, 1, device=ctx.device),
                 ut_zeros=torch.rand(8, 1, device=ctx.device), v=pack_int3(ut_codes).to(ctx.device),
                 v_scales=torch.rand(8, 1, device=ctx.device), v_zeros=torch.rand(8, 1, device=ctx.device),
                 comp_bits=3, comp_group_size=64)
    errors["compensator_groups"] = _expect_error(
        lambda: distribute_tensor(wq, ctx.mesh, [Shard(0)], src_data_rank=None), ValueError, "(64, 64)", "compensator")
    return errors


def tp_compile(ctx: Ctx) -> dict:
    model = _torch_tp(ctx.model("c"), ctx.mesh)
    compiled = torch.compile(model)
    with torch.no_grad():
        out = compiled(ctx.ids).logits
    assert_close(out, ctx.refs["c"], "torch.compile(TP model)")
    return {}


def ep_transformers_plan(ctx: Ctx) -> dict:
    """transformers' own EP plan: whole experts per rank, tokens routed to local experts, all-reduce."""
    from milo_tensor.integrations.distributed import apply_expert_parallel

    model = apply_expert_parallel(ctx.model("a"), ctx.mesh, ep_implementation="all_reduce")
    experts = model.model.layers[0].mlp.experts
    full = ctx.models["a"].model.layers[0].mlp.experts.down_proj
    shard = _local(experts.down_proj)
    r = ctx.rank
    if experts.num_experts != 2 or shard.ranks != full.ranks[2 * r: 2 * r + 2]:
        raise AssertionError(f"rank {r} holds {experts.num_experts} experts with ranks {shard.ranks}")
    assert_equal(_dense(shard), full.dequantize()[2 * r: 2 * r + 2], "expert-parallel down_proj shard")
    assert_equal(_logits(model, ctx.ids), ctx.refs["a"], "EP forward")
    return {}


def _inner_equal(model, ref_model, what):
    """Every MiLo weight of ``model`` (sharded any way) equals the same slice of ``ref_model``'s."""
    from torch.distributed.tensor import DTensor

    n = 0
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        w = _local(p)
        if not hasattr(w, "qdata"):
            continue
        ref = ref_params[name]
        if isinstance(p, DTensor) and p.placements[0].is_shard():
            dim = p.placements[0].dim
            size = p.shape[dim] // WORLD
            ref = ref.narrow(dim, ctx_rank() * size, size)
        for inner in w.__tensor_flatten__()[0]:
            assert_equal(getattr(w, inner).cpu(), getattr(ref, inner), f"{what}: {name}.{inner}")
        if w.ranks != ref.ranks:
            raise AssertionError(f"{what}: {name}.ranks {w.ranks} != {ref.ranks}")
        n += 1
    return n


def ctx_rank() -> int:
    return dist.get_rank()


def dcp_round_trip(ctx: Ctx) -> dict:
    """Save the FSDP2-sharded model with DCP; load into other sharded models (FSDP2, TP, EP)."""
    from milo_tensor.integrations.distributed import apply_expert_parallel, load_sharded, save_sharded

    ckpt = ctx.out / "ckpt_fsdp"
    model = _fully_shard(ctx.model("a"), ctx.mesh)
    _logits(model, ctx.ids)  # after a forward, as in training / serving
    save_sharded(model, ckpt)
    loaded = {}
    for how in ("fsdp", "tp", "ep"):
        target = ctx.model("other")  # other weights, other expert ranks, same layout
        if how == "fsdp":
            target = _fully_shard(target, ctx.mesh)
            _logits(target, ctx.ids)  # the unsharded weights exist already: the load must refresh them
        elif how == "tp":
            target = _torch_tp(target, ctx.mesh)
        else:
            target = apply_expert_parallel(target, ctx.mesh, ep_implementation="all_reduce")
        load_sharded(target, ckpt)
        loaded[how] = _inner_equal(target, ctx.models["a"], f"DCP load into {how}")
        out = _logits(target, ctx.ids)
        (assert_close if how == "tp" else assert_equal)(out, ctx.refs["a"], f"forward after DCP load into {how}")
        if how == "fsdp":
            assert_equal(_logits(target, ctx.ids, "eager"), ctx.refs["a_eager"], "eager experts after DCP load (ranks)")
    return {"milo_weights_checked": loaded}


SCENARIOS = {
    "fsdp_forward": fsdp_forward,
    "fsdp_quantized_compensator": fsdp_quantized_compensator,
    "fsdp_refuses_uneven": fsdp_refuses_uneven,
    "tp_dtensor": tp_dtensor,
    "tp_transformers_plan": tp_transformers_plan,
    "tp_refuses_group_split": tp_refuses_group_split,
    "ep_transformers_plan": ep_transformers_plan,
    "dcp_round_trip": dcp_round_trip,
    "fsdp_compile": fsdp_compile,
    "tp_compile": tp_compile,
}


# ---------------------------------------------------------------------- processes


def _rank_main(rank: int, port: int, backend: str, device: str, out: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    out = Path(out)
    results: dict[str, dict] = {}
    path = out / f"results_rank{rank}.json"
    kwargs = {}
    if device == "cuda":
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device(f"cuda:{rank}")
    dist.init_process_group(backend, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120), **kwargs)
    try:
        ctx = Ctx(rank, device, out)
        for name in names:
            start = time.perf_counter()
            try:
                info = SCENARIOS[name](ctx)
                results[name] = {"ok": True, "info": info}
            except Exception as err:  # noqa: BLE001  (reported, then this rank stops)
                results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                 "traceback": traceback.format_exc()}
            results[name]["seconds"] = round(time.perf_counter() - start, 2)
            path.write_text(json.dumps(results, indent=1, default=str))
            if not results[name]["ok"]:
                os._exit(1)  # the other rank may wait in a collective: it times out and reports
            dist.barrier()
    finally:
        path.write_text(json.dumps(results, indent=1, default=str))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_single_process_load(out: Path) -> dict:
    """The ranks' DCP checkpoint, loaded into a single-process model, is the reference bit for bit."""
    from milo_tensor.integrations.distributed import load_sharded

    data = torch.load(out / "models.pt", weights_only=False)
    target, ref = data["other"], data["a"]
    load_sharded(target, out / "ckpt_fsdp")
    ref_params = dict(ref.named_parameters())
    n = 0
    for name, p in target.named_parameters():
        refp = ref_params[name]
        if hasattr(p, "qdata"):
            for inner in p.__tensor_flatten__()[0]:
                assert_equal(getattr(p, inner), getattr(refp, inner), f"single-process DCP load: {name}.{inner}")
            if p.ranks != refp.ranks:
                raise AssertionError(f"single-process DCP load: {name}.ranks {p.ranks} != {refp.ranks}")
            n += 1
        else:
            assert_equal(p, refp, f"single-process DCP load: {name}")
    assert_equal(_logits(target, data["ids"]), data["refs"]["a"], "single-process forward after DCP load")
    return {"milo_weights_checked": n}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="directory for models, checkpoints and results.json")
    parser.add_argument("--only", default=None, help="comma-separated scenario names (default: all)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < WORLD:
        print(f"--device cuda needs {WORLD} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    names = list(SCENARIOS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="milo_dist_"))
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("results*.json"):
        stale.unlink()

    start = time.perf_counter()
    prepare(out, args.device)
    prepare_s = time.perf_counter() - start
    import torch.multiprocessing as mp

    try:
        mp.spawn(_rank_main, args=(_free_port(), args.backend, args.device, str(out), names), nprocs=WORLD)
    except Exception as err:  # noqa: BLE001  (the per-rank results say what failed)
        print(f"rank processes: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr)

    per_rank = []
    for r in range(WORLD):
        path = out / f"results_rank{r}.json"
        per_rank.append(json.loads(path.read_text()) if path.exists() else {})
    results = {}
    for name in names:
        entries = [pr.get(name) for pr in per_rank]
        if all(e is not None and e["ok"] for e in entries):
            results[name] = {"ok": True, "info": entries[0]["info"], "seconds": max(e["seconds"] for e in entries)}
        else:
            errors = [f"rank {r}: {e['error']}\n{e.get('traceback', '')}" for r, e in enumerate(entries) if e and not e["ok"]]
            results[name] = {"ok": False, "error": "\n".join(errors) or "not run (an earlier scenario failed)"}
    if "dcp_round_trip" in names and results["dcp_round_trip"]["ok"]:
        try:
            results["dcp_single_process_load"] = {"ok": True, "info": _check_single_process_load(out)}
        except Exception as err:  # noqa: BLE001
            results["dcp_single_process_load"] = {"ok": False, "error": f"{type(err).__name__}: {err}\n{traceback.format_exc()}"}
    results["_meta"] = {"ok": True, "backend": args.backend, "device": args.device, "prepare_seconds": round(prepare_s, 2),
                        "total_seconds": round(time.perf_counter() - start, 2), "torch": torch.__version__}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    for name, res in results.items():
        if name != "_meta":
            status = "PASS" if res["ok"] else "FAIL"
            print(f"{status} {name}" + ("" if res["ok"] else "\n" + res["error"]))
    print(f"results: {out / 'results.json'} ({results['_meta']['total_seconds']} s)")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
