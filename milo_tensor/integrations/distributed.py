"""Sharding MiLo weights across processes: FSDP2, tensor / expert parallel (DTensor), DCP checkpoints.

The storage format (docs/format.md) splits without repacking along the expert dim E, the output dim N,
and the input dim K on group boundaries (32 codes = 3 int32 words, and a group is a multiple of 32
codes). Every sharding path in this file and the op handlers at the end of ``milo_tensor/tensor.py``
go through one slicing rule, :func:`narrow`, which maps a slice of the logical weight onto each
inner tensor:

    ================  ===================  ============================  ======================
    inner tensor      E (3D only)          N (output dim)                K (input dim)
    ================  ===================  ============================  ======================
    qdata             dim 0                rows                          words: 3 per 32 codes
    scales, zeros     dim 0                rows                          one column per group
    ut  (U^T)         dim 0                columns (codes if quantized)  -- (shared factor)
    v                 dim 0                -- (shared factor)            columns
    ut_/v_ scales...  dim 0                one column per comp. group    one column per comp. group
    ================  ===================  ============================  ======================

so a column-wise (N) shard keeps the whole ``v`` and a row-wise (K) shard keeps the whole ``ut``:
W[n0:n1] = deq(Q[n0:n1]) + U[n0:n1] V and W[:, k0:k1] = deq(Q[:, k0:k1]) + U V[:, k0:k1] exactly.
A slice that would cut a group (K), a compensator group (quantized compensator), or a packed word is
refused with a ValueError naming the shape and the group size.

User-facing helpers: :func:`check_fsdp_shardable`, :func:`tensor_parallel_plan`,
:func:`apply_tensor_parallel`, :func:`apply_expert_parallel`, and :class:`MiLoCheckpointable` /
:func:`save_sharded` / :func:`load_sharded` for torch.distributed.checkpoint. See docs/distributed.md.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch
from torch import nn

from milo_tensor.tensor import MiLoInt3Tensor

__all__ = [
    "narrow",
    "split",
    "cat",
    "new_zeros",
    "copy_into",
    "check_split",
    "check_fsdp_shardable",
    "tensor_parallel_plan",
    "expert_parallel_plan",
    "apply_tensor_parallel",
    "apply_expert_parallel",
    "MiLoCheckpointable",
    "save_sharded",
    "load_sharded",
]

_E, _N, _K = "E", "N", "K"
_DIM_WORDS = {_E: "the expert dim E", _N: "the output dim N", _K: "the input dim K"}
_COMP_NAMES = ("ut", "v", "ut_scales", "ut_zeros", "v_scales", "v_zeros")


# ---------------------------------------------------------------------- the slicing rule


def _names(w: MiLoInt3Tensor) -> list[str]:
    """Inner tensors present (the optional quantized-compensator ones only when set)."""
    return w.__tensor_flatten__()[0]


def _lead(w: MiLoInt3Tensor) -> int:
    return 1 if w.qdata.ndim == 3 else 0


def _dim_name(w: MiLoInt3Tensor, dim: int) -> str:
    """Logical name (E / N / K) of outer dim ``dim``, honouring the transposed (K x N) view."""
    dim = dim % w.ndim
    names = [_E, _N, _K] if w.ndim == 3 else [_N, _K]
    if w.transposed:
        names[-2], names[-1] = names[-1], names[-2]
    return names[dim]


def _axes(w: MiLoInt3Tensor, name: str) -> dict[str, tuple[int, str]]:
    """For inner tensor ``name``: logical dim -> (axis in the inner tensor, storage unit)."""
    lead = _lead(w)
    out: dict[str, tuple[int, str]] = {_E: (0, "elem")} if lead else {}
    if name == "qdata":
        out[_N] = (lead, "elem")
        out[_K] = (lead + 1, "int3")
    elif name in ("scales", "zeros"):
        out[_N] = (lead, "elem")
        out[_K] = (lead + 1, "group")
    elif name in ("ut", "v"):
        out[_N if name == "ut" else _K] = (lead + 1, "int3" if w.comp_bits == 3 else "elem")
    elif name in ("ut_scales", "ut_zeros", "v_scales", "v_zeros"):
        out[_N if name.startswith("ut") else _K] = (lead + 1, "cgroup")
    return out


def _inner_index(w: MiLoInt3Tensor, unit: str, x: int) -> int:
    if unit == "elem":
        return x
    if unit == "int3":
        return x // 32 * 3
    if unit == "group":
        return x // w.group_size
    return x // w.comp_group_size  # cgroup


def _alignment(w: MiLoInt3Tensor, name: str) -> int:
    """Boundaries along logical dim ``name`` must be multiples of this."""
    if name == _K:
        return w.group_size if w.comp_bits is None else math.lcm(w.group_size, w.comp_group_size)
    if name == _N and w.comp_bits is not None:
        return w.comp_group_size
    return 1


def _logical_size(w: MiLoInt3Tensor, name: str) -> int:
    n, k = w.qdata.shape[-2], w.scales.shape[-1] * w.group_size
    return {_E: w.qdata.shape[0] if _lead(w) else 1, _N: n, _K: k}[name]


def check_split(w: MiLoInt3Tensor, dim: int, sizes: Sequence[int]) -> None:
    """Raise a ValueError if pieces of ``sizes`` along outer dim ``dim`` would cut a group or a word."""
    name = _dim_name(w, dim)
    align = _alignment(w, name)
    total = _logical_size(w, name)
    if align == 1:
        return
    bounds, start = [], 0
    for size in sizes:
        start += size
        bounds.append(start)
    if all(b % align == 0 or b == total for b in bounds):
        return
    if name == _K:
        why = (
            f"K splits only on group boundaries (group_size={w.group_size}"
            + (f", compensator group size {w.comp_group_size}" if w.comp_bits is not None else "")
            + "; 32 codes share 3 packed int32 words)"
        )
    else:
        why = (
            f"the quantized compensator U is stored in groups of {w.comp_group_size} along N "
            f"(compensator_bits={w.comp_bits})"
        )
    raise ValueError(
        f"cannot split a MiLoInt3Tensor of shape {tuple(w.shape)} (group_size={w.group_size}) along dim {dim} "
        f"({_DIM_WORDS[name]}, {name}={total}) into pieces {list(sizes)}: {why}, so every piece must be a multiple "
        f"of {align}. Use a parallel degree that divides {name}/{align} = {total // align}, or quantize with a "
        f"smaller group size."
    )


def narrow(w: MiLoInt3Tensor, dim: int, start: int, length: int) -> MiLoInt3Tensor:
    """The slice ``w.narrow(dim, start, length)`` as a MiLoInt3Tensor whose inner tensors are views."""
    dim = dim % w.ndim
    size = w.shape[dim]
    if start < 0:
        start += size
    if not (0 <= start and length >= 0 and start + length <= size):
        raise IndexError(f"narrow({dim}, {start}, {length}) is out of range for a MiLoInt3Tensor of shape {tuple(w.shape)}")
    name = _dim_name(w, dim)
    end = start + length
    check_split(w, dim, [start, length] if start else [length])
    changes: dict[str, Any] = {}
    for tname in _names(w):
        ax = _axes(w, tname).get(name)
        if ax is None:
            continue
        axis, unit = ax
        s, e = _inner_index(w, unit, start), _inner_index(w, unit, end)
        if end == size:
            e = getattr(w, tname).shape[axis]
        changes[tname] = getattr(w, tname).narrow(axis, s, e - s)
    shape = list(w.shape)
    shape[dim] = length
    ranks = w.ranks[start:end] if name == _E else w.ranks
    return w._with(**changes, shape=tuple(shape), ranks=ranks)


def split(w: MiLoInt3Tensor, split_size: int | Sequence[int], dim: int = 0) -> list[MiLoInt3Tensor]:
    """``torch.split`` semantics (an int gives equal pieces, the last one smaller)."""
    dim = dim % w.ndim
    size = w.shape[dim]
    if isinstance(split_size, int):
        if split_size <= 0:
            raise ValueError(f"split size must be positive, got {split_size}")
        sizes = [min(split_size, size - s) for s in range(0, size, split_size)] or [0]
    else:
        sizes = [int(s) for s in split_size]
        if sum(sizes) != size:
            raise ValueError(f"split sizes {sizes} do not sum to dim {dim} of size {size}")
    check_split(w, dim, sizes)
    out, start = [], 0
    for s in sizes:
        out.append(narrow(w, dim, start, s))
        start += s
    return out


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bool(torch.equal(a, b))


def cat(tensors: Sequence[MiLoInt3Tensor], dim: int = 0) -> MiLoInt3Tensor:
    """Concatenate MiLo tensors that are pieces of one weight (the inverse of :func:`split`).

    Along E the pieces may have different ranks (the compensator rows are zero-padded to the
    largest R). Along N (or K) the pieces must share the factor that has no N (K) dim -- V (U) --
    as pieces of one weight do; concatenating unrelated weights is refused.
    """
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat of an empty list")
    if not all(isinstance(t, MiLoInt3Tensor) for t in tensors):
        kinds = sorted({type(t).__name__ for t in tensors})
        raise NotImplementedError(f"aten.cat: cannot concatenate a MiLoInt3Tensor with other tensors ({kinds})")
    base = tensors[0]
    dim = dim % base.ndim
    for t in tensors[1:]:
        same_meta = (
            t.ndim == base.ndim and t.dtype == base.dtype and t.group_size == base.group_size
            and t.comp_bits == base.comp_bits and t.comp_group_size == base.comp_group_size
            and t.transposed == base.transposed and _names(t) == _names(base)
            and all(t.shape[d] == base.shape[d] for d in range(base.ndim) if d != dim)
        )
        if not same_meta:
            raise ValueError(f"aten.cat: MiLoInt3Tensors {base!r} and {t!r} are not pieces of one weight along dim {dim}")
    if len(tensors) == 1:
        return base._with()
    name = _dim_name(base, dim)
    changes: dict[str, Any] = {}
    if name == _E:
        r_max = max(t.ut.shape[1] for t in tensors)
        for tname in _names(base):
            parts = []
            for t in tensors:
                x = getattr(t, tname)
                if tname in _COMP_NAMES and x.shape[1] < r_max:  # pad compensator rows with zeros
                    pad = x.new_zeros((x.shape[0], r_max - x.shape[1], *x.shape[2:]))
                    x = torch.cat([x, pad], dim=1)
                parts.append(x)
            changes[tname] = torch.cat(parts, dim=0)
        ranks = tuple(r for t in tensors for r in t.ranks)
    else:
        for tname in _names(base):
            ax = _axes(base, tname).get(name)
            if ax is None:
                if not all(_same(getattr(t, tname), getattr(base, tname)) for t in tensors[1:]):
                    raise NotImplementedError(
                        f"aten.cat along {_DIM_WORDS[name]}: the pieces have different '{tname}' factors, so they are "
                        f"not slices of one MiLo weight; concatenating unrelated weights is not supported"
                    )
                continue
            changes[tname] = torch.cat([getattr(t, tname) for t in tensors], dim=ax[0])
        ranks = base.ranks
    shape = list(base.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return base._with(**changes, shape=tuple(shape), ranks=ranks)


def new_zeros(w: MiLoInt3Tensor, size: Sequence[int], *, empty: bool = False, device=None, dtype=None) -> MiLoInt3Tensor:
    """A zero (rank-0) MiLo tensor like ``w`` whose dim 0 has ``size[0]`` rows (FSDP's padded shard)."""
    size = tuple(int(s) for s in size)
    if len(size) != w.ndim or size[1:] != tuple(w.shape[1:]) or w.transposed:
        if len(size) == 1 and size[0] == 0:
            raise ValueError(
                f"a MiLoInt3Tensor of shape {tuple(w.shape)} cannot be split into an empty shard: dim 0 has fewer rows "
                f"than there are ranks; shard it over a mesh whose size divides {w.shape[0]}"
            )
        raise NotImplementedError(
            f"new_zeros/new_empty({list(size)}) on a MiLoInt3Tensor of shape {tuple(w.shape)}: only a new size of "
            f"dim 0 (same trailing dims) is supported"
        )
    name = _dim_name(w, 0)
    align = _alignment(w, name)
    if size[0] % align:
        check_split(w, 0, [size[0]])
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"a MiLoInt3Tensor has a floating-point dtype, got {dtype}")
    factory = torch.empty if empty else torch.zeros
    fields: dict[str, Any] = {}
    for tname in _names(w):
        t = getattr(w, tname)
        shape = list(t.shape)
        ax = _axes(w, tname).get(name)
        if ax is not None:
            shape[ax[0]] = _inner_index(w, ax[1], size[0])
        t_dtype = dtype if (dtype is not None and t.dtype.is_floating_point) else t.dtype
        fields[tname] = factory(shape, dtype=t_dtype, device=device or t.device)
    ranks = (0,) * size[0] if name == _E else (0,) * len(w.ranks)
    return w._with(**fields, shape=size, ranks=ranks)


def copy_into(dst: MiLoInt3Tensor, src: MiLoInt3Tensor) -> MiLoInt3Tensor:
    """In-place copy of every inner tensor and of ``ranks`` (the layout must match)."""
    if not isinstance(src, MiLoInt3Tensor):
        raise ValueError(
            f"copy_: cannot copy a {type(src).__name__} into a MiLoInt3Tensor; quantize it first "
            f"(MiLoInt3Tensor.from_float) or assign the parameter"
        )
    dst_names, src_names = _names(dst), _names(src)
    mismatch = (
        dst.shape != src.shape or dst_names != src_names or dst.group_size != src.group_size
        or dst.comp_bits != src.comp_bits or dst.comp_group_size != src.comp_group_size
        or dst.transposed != src.transposed or len(dst.ranks) != len(src.ranks)
        or any(getattr(dst, n).shape != getattr(src, n).shape for n in dst_names)
    )
    if mismatch:
        raise ValueError(f"Not supported args for copy_ due to metadata mismatch: {dst!r} <- {src!r}")
    for n in dst_names:
        getattr(dst, n).copy_(getattr(src, n))
    if dst.ranks != src.ranks:
        dst.ranks = src.ranks
        _bump_ranks_epoch(dst)
    return dst


def _bump_ranks_epoch(w: MiLoInt3Tensor) -> None:
    w.__dict__["_milo_ranks_epoch"] = w.__dict__.get("_milo_ranks_epoch", 0) + 1


# ---------------------------------------------------------------------- FSDP2 all-gather extension


def fsdp_pre_all_gather(w: MiLoInt3Tensor, mesh, outer_size, outer_stride, module, mp_policy):
    """All-gather inputs of a dim-0 shard: every inner tensor that has dim 0's logical dim.

    A 3D expert stack is sharded along E, so every inner tensor (codes, scales, zeros, U^T, V and
    their compensator qparams) is gathered, plus this shard's ranks (an int32 tensor) so the
    unsharded tensor knows every expert's rank. A 2D weight is sharded along N: codes, scales,
    zeros and the columns of U^T are gathered, while V (R x K, no N dim) is kept whole on every
    rank and not communicated.
    """
    world = mesh.size()
    if w.transposed:
        raise NotImplementedError("FSDP2 shards a MiLoInt3Tensor in its stored (N x K / E x N x K) orientation only")
    if outer_size[0] % world:
        what = "experts E" if w.ndim == 3 else "output features N"
        raise ValueError(
            f"FSDP2 cannot shard a MiLoInt3Tensor of shape {tuple(outer_size)} over {world} ranks: its dim 0 "
            f"({what}={outer_size[0]}) is not divisible by the world size. FSDP2 pads an uneven last shard to the "
            f"size of the others and requires the all-gather inputs to have that padded *outer* shape, which packed "
            f"3-bit codes cannot have. Use a mesh size that divides {outer_size[0]}, or keep this module out of "
            f"fully_shard (ignored_params=...)."
        )
    param_dtype = getattr(mp_policy, "param_dtype", None)
    name = _dim_name(w, 0)
    inputs, gathered = [], []
    for tname in _names(w):
        ax = _axes(w, tname).get(name)
        if ax is None:
            continue
        t = getattr(w, tname)
        if param_dtype is not None and t.dtype.is_floating_point and t.dtype != param_dtype:
            t = t.to(param_dtype)
        inputs.append(t.contiguous())
        gathered.append((tname, ax[0]))
    if name == _E:
        inputs.append(w.ranks_tensor())
    epoch = w.__dict__.get("_milo_ranks_epoch", 0)
    return tuple(inputs), (tuple(gathered), param_dtype, world, epoch)


def fsdp_post_all_gather(w: MiLoInt3Tensor, outputs, metadata, param_dtype, *, out=None):
    gathered, cast_dtype, world, epoch = metadata
    outputs = list(outputs)
    ranks_t = outputs.pop() if _dim_name(w, 0) == _E else None
    fields: dict[str, torch.Tensor] = {}
    owned: list[torch.Tensor] = []
    for (tname, axis), g in zip(gathered, outputs):
        if axis == 0:  # rank-major concatenation along dim 0 is the unsharded tensor
            fields[tname] = g
            continue
        # a 2D weight's U^T (and its qparams) is [R, N]: the gathered [world * R, n] is rank-major,
        # so the columns of each rank go to their place in [R, world * n]
        rows, cols = g.shape[0] // world, g.shape[1]
        dst = getattr(out, tname) if out is not None else g.new_empty((rows, world * cols))
        dst.view(rows, world, cols).copy_(g.view(world, rows, cols).transpose(0, 1))
        fields[tname] = dst
        owned.append(dst)
    for tname in _names(w):  # kept whole on every rank (V of a 2D weight)
        if tname in fields:
            continue
        t = getattr(w, tname)
        if cast_dtype is not None and t.dtype.is_floating_point and t.dtype != cast_dtype:
            if out is not None:
                getattr(out, tname).copy_(t)
                continue
            t = t.to(cast_dtype)
            owned.append(t)
        fields[tname] = t
    if out is not None:
        if ranks_t is not None and out.__dict__.get("_milo_ranks_epoch", 0) != epoch:
            out.ranks = tuple(int(r) for r in ranks_t.tolist())  # ranks changed (a checkpoint load): re-read
            out.__dict__["_milo_ranks_epoch"] = epoch
        return None
    ranks = tuple(int(r) for r in ranks_t.tolist()) if ranks_t is not None else w.ranks
    shape = (w.shape[0] * world, *w.shape[1:])
    full = w._with(**fields, shape=shape, ranks=ranks)
    full.__dict__["_milo_ranks_epoch"] = epoch
    return full, tuple(owned)


def check_fsdp_shardable(module: nn.Module, world_size: int) -> None:
    """Raise a ValueError naming every MiLo parameter of ``module`` that FSDP2 cannot shard evenly.

    Call it before ``fully_shard`` (the FSDP2 all-gather refuses the same parameters at the first
    forward, on every rank, with the same message).
    """
    bad = []
    for name, p in module.named_parameters():
        if isinstance(p, MiLoInt3Tensor) and p.shape[0] % world_size:
            bad.append(f"{name} {tuple(p.shape)}")
        elif isinstance(p, MiLoInt3Tensor) and p.ndim == 2 and p.comp_bits is not None:
            try:
                check_split(p, 0, [p.shape[0] // world_size] * world_size)
            except ValueError as err:
                bad.append(f"{name}: {err}")
    if bad:
        raise ValueError(
            f"FSDP2 over {world_size} ranks needs dim 0 of every MiLo weight to divide evenly (and, with a quantized "
            f"compensator, each 2D weight's N / world to be a multiple of the compensator group size): "
            + "; ".join(bad)
        )


# ---------------------------------------------------------------------- tensor / expert parallel


def _expand_plan(model: nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """Fill in the layer numbers of a transformers wildcard plan (``layers.*.``), as transformers does
    when it distributes a model at load time: a parameter takes its own rule, else its module's rule;
    a module with a rule is listed after its parameters (sharded first, hooked second)."""
    patterns = [(re.compile("^" + re.escape(k).replace(r"\*", r"\d+") + "$"), v) for k, v in plan.items()]

    def style_of(name: str) -> str | None:
        return next((style for pat, style in patterns if pat.match(name)), None)

    out: dict[str, str] = {}
    for mname, module in model.named_modules():
        module_style = style_of(mname) if mname else None
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            style = style_of(full) or module_style
            if style is not None:
                out[full] = style
        if module_style is not None:
            out[mname] = module_style
    return out


def _experts_tp_entries(model: nn.Module) -> dict[str, str]:
    """The row/column split of every fused experts module (3D ``gate_up_proj`` and ``down_proj``):
    the entries transformers <= 5.24 put in its MoE TP plans and 5.25 dropped in favour of EP."""
    out: dict[str, str] = {}
    for mname, module in model.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.ndim == down.ndim == 3:
            out[f"{mname}.gate_up_proj"] = "packed_colwise"
            out[f"{mname}.down_proj"] = "rowwise"
            out[mname] = "moe_tp_experts"
    return out


def tensor_parallel_plan(model: nn.Module, *, shard_experts: bool = False) -> dict[str, str]:
    """transformers' own TP plan of ``model`` (``model.tp_plan``: the config's ``base_model_tp_plan``
    and the class's ``_tp_plan``) with the layer numbers filled in. Quantized experts use the same
    styles as float ones: ``packed_colwise`` gate_up (N split, gate and up halves each), ``rowwise``
    down (K split on group boundaries), ``moe_tp_experts`` (all-reduce of the partial outputs).

    transformers 5.25 took those experts entries out of its MoE plans (experts are meant to be
    split by expert parallelism, :func:`apply_expert_parallel`), so there the model's plan keeps
    every expert whole on every rank. ``shard_experts=True`` adds them back for each fused experts
    module the plan leaves out, the TP-only layout of transformers 5.24."""
    plan = _expand_plan(model, dict(getattr(model, "tp_plan", None) or {}))
    if shard_experts:
        for name, style in _experts_tp_entries(model).items():
            plan.setdefault(name, style)
    return plan


def expert_parallel_plan(model: nn.Module) -> dict[str, str]:
    """transformers' own EP plan (``model.ep_plan``: ``grouped_gemm`` expert weights split along E,
    ``ep_dispatch_experts`` on the experts module) with the layer numbers filled in."""
    return _expand_plan(model, dict(getattr(model, "ep_plan", None) or {}))


def _check_plan_shapes(model: nn.Module, plan: dict[str, str], world: int) -> None:
    """Refuse, before touching the model, a TP / EP plan that would cut a group or packed word."""
    params = dict(model.named_parameters())
    for name, style in plan.items():
        p = params.get(name)
        if not isinstance(p, MiLoInt3Tensor):
            continue
        if style in ("colwise", "colwise_rep", "colwise_gather_output"):
            dim = p.ndim - 2
            sizes = [len(c) for c in torch.arange(p.shape[dim]).chunk(world)]
        elif style in ("rowwise", "rowwise_rep", "rowwise_split_input"):
            dim = p.ndim - 1
            sizes = [len(c) for c in torch.arange(p.shape[dim]).chunk(world)]
        elif style == "packed_colwise":
            dim = p.ndim - 2
            half = p.shape[dim] // 2
            sizes = [len(c) for c in torch.arange(half).chunk(world)] * 2
        elif style == "grouped_gemm":
            dim = 0
            if p.shape[0] % world:
                raise ValueError(f"expert parallel: {name} {tuple(p.shape)} has {p.shape[0]} experts, not divisible by {world} ranks")
            continue
        else:
            continue
        try:
            check_split(p, dim, sizes)
        except ValueError as err:
            raise ValueError(f"{style} on {name}: {err}") from None


def apply_tensor_parallel(
    model: nn.Module, tp_mesh, plan: dict[str, str] | None = None, *, shard_experts: bool = False
) -> nn.Module:
    """Shard a (quantized) transformers model with transformers' own TP styles on ``tp_mesh``.

    ``plan`` defaults to :func:`tensor_parallel_plan` (``shard_experts`` is passed to it). MiLo
    weights are split locally on every rank (each rank must hold the same quantized model), with the
    split checked first so that a plan that would cut a group or a packed word fails before any
    parameter is replaced.
    """
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    stacked = [name for name, m in model.named_modules() if hasattr(m, "_milo_qkv_pending")]
    if stacked:
        raise ValueError(f"{stacked[0]} runs its q/k/v projections as one stacked weight (fuse_qkv), which a "
                         f"tensor-parallel split would leave whole on every rank; split the unfused model instead")
    plan = tensor_parallel_plan(model, shard_experts=shard_experts) if plan is None else plan
    _check_plan_shapes(model, plan, tp_mesh.size())
    return apply_tensor_parallelism(model, tp_mesh, plan)


def apply_expert_parallel(
    model: nn.Module, ep_mesh, tp_mesh=None, plan: dict[str, str] | None = None, ep_implementation: str = "auto"
) -> nn.Module:
    """Split the experts of a (quantized) transformers MoE model across ``ep_mesh`` (along E).

    Uses transformers' own expert parallelism: ``grouped_gemm`` shards each 3D expert weight along E
    (each rank keeps ``E / world`` whole experts, codes, qparams and compensators alike, with their
    ranks), and ``ep_dispatch_experts`` routes each rank's tokens to its local experts, which run the
    "milo" experts path (sentinel ids for other ranks' experts are skipped). ``tp_mesh`` is the group
    of ranks holding the same batch: ``ep_mesh`` itself when every rank sees the same tokens (then
    ``ep_implementation="auto"`` all-reduces at inference).
    """
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    fused = [name for name, m in model.named_modules() if getattr(m, "milo_shared", None) is not None]
    if fused:
        raise ValueError(f"{fused[0]} holds its layer's shared experts as extra experts (fuse_shared_experts), which "
                         f"an expert-parallel split would hand to one rank; split the unfused model instead")
    plan = expert_parallel_plan(model) if plan is None else plan
    if not plan:
        raise ValueError(f"{type(model).__name__} has no expert-parallel plan (config.base_model_ep_plan)")
    _check_plan_shapes(model, plan, ep_mesh.size())
    return apply_expert_parallelism(model, ep_mesh, ep_mesh if tp_mesh is None else tp_mesh, plan, ep_implementation)


# ---------------------------------------------------------------------- checkpoints (DCP)

_META_SUFFIX = "._milo"


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _inner_placements(w: MiLoInt3Tensor, tname: str, placements) -> list:
    """DTensor placements of inner tensor ``tname`` given the outer tensor's placements."""
    from torch.distributed.tensor import Replicate, Shard

    out = []
    for p in placements:
        if isinstance(p, Shard):
            ax = _axes(w, tname).get(_dim_name(w, p.dim))
            out.append(Replicate() if ax is None else Shard(ax[0]))
        elif isinstance(p, Replicate):
            out.append(Replicate())
        else:
            raise NotImplementedError(
                f"cannot checkpoint a MiLo weight sharded with placement {p}: DCP stores each rank's shard as one "
                f"box of the global tensor, and a {type(p).__name__} shard (e.g. transformers' packed_colwise "
                f"gate_up) is several; torch.distributed.checkpoint refuses it for plain tensors too. Save the "
                f"model unsharded, or sharded with FSDP2, expert parallel, or Colwise/RowwiseParallel"
            )
    return out


def _global_inner_shape(w_local: MiLoInt3Tensor, tname: str, global_shape: Sequence[int]) -> tuple[int, ...]:
    t = getattr(w_local, tname)
    shape = list(t.shape)
    for d, size in enumerate(global_shape):
        ax = _axes(w_local, tname).get(_dim_name(w_local, d))
        if ax is not None:
            shape[ax[0]] = _inner_index(w_local, ax[1], size)
    return tuple(shape)


def _milo_meta(w: MiLoInt3Tensor, global_shape) -> dict[str, Any]:
    from milo_tensor.quant.packing import FORMAT_VERSION

    return {
        "format_version": FORMAT_VERSION,
        "shape": list(global_shape),
        "dtype": str(w.dtype).removeprefix("torch."),
        "group_size": w.group_size,
        "comp_bits": w.comp_bits,
        "comp_group_size": w.comp_group_size,
        "inner": _names(w),
    }


def _flatten_param(fqn: str, value: torch.Tensor, out: dict[str, Any]) -> None:
    """Replace one MiLo entry (plain or a DTensor of MiLo shards) by plain / DTensor inner tensors."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        w = value._local_tensor
        mesh, placements, global_shape = value.device_mesh, value.placements, tuple(value.shape)
    else:
        w, mesh, placements, global_shape = value, None, (), tuple(value.shape)
    if w.transposed:
        raise NotImplementedError(f"{fqn}: cannot checkpoint a transposed MiLoInt3Tensor view")
    for tname in _names(w):
        t = getattr(w, tname)
        if mesh is None:
            out[f"{fqn}.{tname}"] = t
            continue
        shape = _global_inner_shape(w, tname, global_shape)
        out[f"{fqn}.{tname}"] = DTensor.from_local(
            t, mesh, _inner_placements(w, tname, placements), run_check=False,
            shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride(),
        )
    ranks = torch.tensor(w.ranks, dtype=torch.int32, device=w.qdata.device)
    if mesh is not None and w.ndim == 3:
        from torch.distributed.tensor import Replicate, Shard

        rp = [Shard(0) if isinstance(p, Shard) and _dim_name(w, p.dim) == _E else Replicate() for p in placements]
        n_ranks = global_shape[0]
        ranks = DTensor.from_local(ranks, mesh, rp, run_check=False, shape=torch.Size([n_ranks]), stride=(1,))
    elif mesh is not None:
        from torch.distributed.tensor import Replicate

        ranks = DTensor.from_local(ranks, mesh, [Replicate()] * mesh.ndim, run_check=False)
    out[f"{fqn}.ranks"] = ranks
    out[fqn + _META_SUFFIX] = _milo_meta(w, global_shape)


def _milo_entries(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    out = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(_local(p), MiLoInt3Tensor):
                out[f"{mname}.{pname}" if mname else pname] = (module, pname)
    return out


class MiLoCheckpointable:
    """A ``torch.distributed.checkpoint`` Stateful view of a model with (sharded) MiLo weights.

    ``dcp.save({"model": MiLoCheckpointable(model)}, checkpoint_id=path)`` stores every MiLo weight
    as its plain inner tensors (``<fqn>.qdata``, ``.scales``, ``.zeros``, ``.ut``, ``.v``, ...; DTensors
    with the placements the weight's sharding implies, so DCP can reshard them), ``<fqn>.ranks`` (an
    int32 tensor) and ``<fqn>._milo`` (format version, shape, dtype, group sizes). Other parameters
    and buffers are stored as ``model.state_dict()`` has them. ``dcp.load`` into the same wrapper
    writes the stored data into the model's MiLo weights in place (any sharding: single process,
    FSDP2, TP, EP), after checking that the stored layout matches; the int3 words of a format-1
    checkpoint are then repacked in place (each rank its own shards: shards hold whole 32-code chunks).
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        sd = self.model.state_dict()
        out: dict[str, Any] = {}
        milo = _milo_entries(self.model)
        for key, value in sd.items():
            if key in milo:
                _flatten_param(key, value, out)
            else:
                out[key] = value
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from milo_tensor.checkpoint import check_format_version, to_current_layout

        milo = _milo_entries(self.model)
        plain = {}
        for key, value in state_dict.items():
            if any(key.startswith(f"{m}.") for m in milo):
                continue
            plain[key] = value
        for fqn, (module, pname) in milo.items():
            w = _local(getattr(module, pname))
            meta = state_dict.get(fqn + _META_SUFFIX)
            if meta is None:
                raise KeyError(f"the checkpoint has no MiLo entry for {fqn}")
            version = check_format_version(fqn, meta.get("format_version"))
            expected = _milo_meta(w, tuple(getattr(module, pname).shape))
            for field in ("shape", "dtype", "group_size", "comp_bits", "comp_group_size", "inner"):
                if meta[field] != expected[field]:
                    raise ValueError(
                        f"{fqn}: the checkpoint stores {field}={meta[field]!r} but the model has {expected[field]!r}; "
                        f"build the model with the same quantization config before loading"
                    )
            for tname in _names(w):  # DCP loaded in place; copy when the dict held other tensors
                src = _local(state_dict[f"{fqn}.{tname}"])
                dst = getattr(w, tname)
                if src is not dst and src.data_ptr() != dst.data_ptr():
                    dst.copy_(src)
            stored = {tname: getattr(w, tname) for tname in _names(w)}
            for tname, t in to_current_layout(version, w.comp_bits, stored).items():
                if t is not stored[tname]:
                    stored[tname].copy_(t)  # a format-1 checkpoint: repacked in place
            w.ranks = tuple(int(r) for r in _local(state_dict[f"{fqn}.ranks"]).tolist())
            # every rank, changed or not (another rank's experts may have changed): FSDP2's unsharded
            # weight re-reads the all-gathered ranks at the next forward
            _bump_ranks_epoch(w)
        missing, unexpected = self.model.load_state_dict(
            {k: v for k, v in plain.items()}, strict=False, assign=False
        ) if plain else ([], [])
        missing = [m for m in missing if m not in milo]
        if missing or unexpected:
            raise KeyError(f"checkpoint/model mismatch: missing {missing}, unexpected {unexpected}")


def save_sharded(model: nn.Module, checkpoint_id, **kwargs) -> None:
    """``dcp.save`` of a model with MiLo weights (see :class:`MiLoCheckpointable`)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": MiLoCheckpointable(model)}, checkpoint_id=checkpoint_id, **kwargs)


def load_sharded(model: nn.Module, checkpoint_id, **kwargs) -> None:
    """``dcp.load`` into a model with MiLo weights of the same layout, sharded any supported way."""
    import torch.distributed.checkpoint as dcp

    dcp.load({"model": MiLoCheckpointable(model)}, checkpoint_id=checkpoint_id, **kwargs)
