"""MiLoInt3Tensor: a weight stored as 3-bit codes plus a low-rank compensator.

The layout of every inner tensor is documented in docs/format.md. The tensor keeps the logical
shape and dtype of the float weight it replaces, so modules, optimizers' state_dict walks and
transformers see an ordinary parameter, while matmuls route to the ``milo::`` custom ops.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing
from torchao.utils import TorchAOBaseTensor, fill_defaults

from milo_tensor.ops import reference
from milo_tensor.quant.affine import dequantize_affine
from milo_tensor.quant.compensator import milo_compress, quantize_compensator
from milo_tensor.quant.packing import pack_int3, unpack_int3

__all__ = ["MiLoInt3Tensor"]

aten = torch.ops.aten

_COMP_BITS = (None, 8, 3)


class MiLoInt3Tensor(TorchAOBaseTensor):
    """A 2D weight (N × K) or a stack of expert weights (E × N × K) in MiLo form.

    Tensor data: ``qdata`` (packed codes), ``scales``, ``zeros``, ``ut`` (U transposed, R × N),
    ``v`` (R × K); with a quantized compensator also ``ut_scales``, ``ut_zeros``, ``v_scales``,
    ``v_zeros``. Attributes: logical ``shape``, ``group_size``, per-expert ``ranks``,
    ``comp_bits`` / ``comp_group_size`` for the compensator, and ``transposed``, which marks the
    (K × N) view that ``weight.t()`` hands to ``mm``/``addmm``.
    """

    tensor_data_names = ["qdata", "scales", "zeros", "ut", "v"]
    tensor_attribute_names = ["shape", "group_size", "ranks"]
    optional_tensor_data_names = ["ut_scales", "ut_zeros", "v_scales", "v_zeros"]
    optional_tensor_attribute_names = ["comp_bits", "comp_group_size", "transposed"]

    def __new__(
        cls,
        qdata: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        ut: torch.Tensor,
        v: torch.Tensor,
        shape: Sequence[int],
        group_size: int,
        ranks: Sequence[int],
        ut_scales: torch.Tensor | None = None,
        ut_zeros: torch.Tensor | None = None,
        v_scales: torch.Tensor | None = None,
        v_zeros: torch.Tensor | None = None,
        comp_bits: int | None = None,
        comp_group_size: int | None = None,
        transposed: bool = False,
    ):
        return torch.Tensor._make_wrapper_subclass(
            cls, tuple(shape), dtype=scales.dtype, device=qdata.device, requires_grad=False
        )

    def __init__(
        self,
        qdata: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        ut: torch.Tensor,
        v: torch.Tensor,
        shape: Sequence[int],
        group_size: int,
        ranks: Sequence[int],
        ut_scales: torch.Tensor | None = None,
        ut_zeros: torch.Tensor | None = None,
        v_scales: torch.Tensor | None = None,
        v_zeros: torch.Tensor | None = None,
        comp_bits: int | None = None,
        comp_group_size: int | None = None,
        transposed: bool = False,
    ):
        super().__init__()
        self.qdata = qdata
        self.scales = scales
        self.zeros = zeros
        self.ut = ut
        self.v = v
        self.group_size = int(group_size)
        self.ranks = tuple(int(r) for r in ranks)
        self.ut_scales = ut_scales
        self.ut_zeros = ut_zeros
        self.v_scales = v_scales
        self.v_zeros = v_zeros
        self.comp_bits = comp_bits
        self.comp_group_size = comp_group_size
        self.transposed = bool(transposed)

    def __tensor_flatten__(self) -> tuple[list[str], dict]:
        """torch.compile flattens every MiLo weight on every call of a compiled function (the guard on
        its metadata, then the unwrapping into inner tensors), part of the extra host time of a
        compiled milo decode step over bf16 (docs/benchmarks.md, Decode). The answer only changes
        when an attribute is assigned, so it is cached until then."""
        cached = self.__dict__.get("_flatten_cache")
        if cached is None:
            cached = super().__tensor_flatten__()
            self.__dict__["_flatten_cache"] = cached
        return list(cached[0]), dict(cached[1])

    def __setattr__(self, name: str, value) -> None:
        self.__dict__.pop("_flatten_cache", None)
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        ranks: int | Sequence[int],
        *,
        group_size: int = 64,
        iters: int = 20,
        quantizer: str = "hqq",
        comp_bits: int | None = None,
        comp_group_size: int = 64,
        progress: bool = False,
    ) -> "MiLoInt3Tensor":
        """Compress a float weight (N × K, or E × N × K for experts) with the MiLo loop."""
        if isinstance(weight, MiLoInt3Tensor):
            raise ValueError("weight is already a MiLoInt3Tensor; quantize the float weight once")
        if weight.ndim not in (2, 3):
            raise ValueError(
                f"MiLoInt3Tensor holds a 2D Linear weight (N x K) or a 3D expert stack (E x N x K); "
                f"got a weight of shape {tuple(weight.shape)}"
            )
        if comp_bits not in _COMP_BITS:
            raise ValueError(f"compensator bits must be one of None (float), 8 or 3; got {comp_bits!r}")
        dtype = weight.dtype
        result = milo_compress(
            weight.detach(), ranks, bits=3, group_size=group_size, iters=iters,
            quantizer=quantizer, qparam_dtype=dtype, progress=progress,
        )
        q = result.quantized
        ut = result.u.transpose(-1, -2).contiguous()
        v = result.v.contiguous()
        comp = _encode_compensator(ut, v, dtype, comp_bits, comp_group_size)
        return cls(
            pack_int3(q.codes).contiguous(),
            q.scale.to(dtype).contiguous(),
            q.zero.to(dtype).contiguous(),
            comp["ut"],
            comp["v"],
            tuple(weight.shape),
            group_size,
            result.ranks,
            ut_scales=comp.get("ut_scales"),
            ut_zeros=comp.get("ut_zeros"),
            v_scales=comp.get("v_scales"),
            v_zeros=comp.get("v_zeros"),
            comp_bits=comp_bits,
            comp_group_size=comp_group_size if comp_bits is not None else None,
        )

    # ------------------------------------------------------------------ views of the data

    @property
    def is_experts(self) -> bool:
        return self.qdata.ndim == 3

    def ranks_tensor(self) -> torch.Tensor:
        """``ranks`` as an int32 tensor on the weight's device, made once per (ranks, device): the grouped
        op takes it to skip each expert's rank padding, and FSDP2 all-gathers it with an expert shard."""
        cached = self.__dict__.get("_milo_ranks_tensor")
        if cached is None or cached[0] != self.ranks or cached[1].device != self.qdata.device:
            cached = (self.ranks, torch.tensor(self.ranks, dtype=torch.int32, device=self.qdata.device))
            self.__dict__["_milo_ranks_tensor"] = cached
        return cached[1]

    def compensator(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Uᵀ, V) in the tensor's dtype, decoded from codes if the compensator is quantized."""
        if self.comp_bits is None:
            return self.ut, self.v
        ut = _decode_rows(self.ut, self.ut_scales, self.ut_zeros, self.comp_bits, self.comp_group_size)
        v = _decode_rows(self.v, self.v_scales, self.v_zeros, self.comp_bits, self.comp_group_size)
        return ut.to(self.dtype), v.to(self.dtype)

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight deq(Q) + U V this tensor stands for, in its logical orientation."""
        ut, v = self.compensator()
        acc = torch.promote_types(self.dtype, torch.float32)
        w = reference.dequantize_int3(self.qdata, self.scales, self.zeros, self.group_size, acc)
        if ut.shape[-2] > 0:
            w = w + ut.to(acc).transpose(-1, -2) @ v.to(acc)
        if self.transposed:
            w = w.transpose(-1, -2)
        return w.to(output_dtype or self.dtype)

    def storage_nbytes(self) -> int:
        """Bytes of every inner tensor as allocated (rank padding included)."""
        names = self.__tensor_flatten__()[0]
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    def payload_nbytes(self) -> int:
        """Bytes that carry information: codes, qparams and r_e (N + K) compensator entries."""
        n, k = self.qdata.shape[-2], self.v.shape[-1]
        base = sum(t.numel() * t.element_size() for t in (self.qdata, self.scales, self.zeros))
        comp_elems = sum(self.ranks) * (n + k)
        if self.comp_bits is None:
            comp = comp_elems * self.ut.element_size()
        else:
            groups = sum(self.ranks) * (n + k) // self.comp_group_size
            comp = comp_elems * self.comp_bits // 8 + 2 * groups * self.ut_scales.element_size()
        return base + comp

    def _stable_hash_for_caching(self) -> str:
        """Compile-cache key: the metadata that changes the traced graph (not the data)."""
        return repr((type(self).__name__, tuple(self.shape), self.dtype, self.group_size, self.ranks,
                     self.comp_bits, self.comp_group_size, self.transposed))

    def __repr__(self) -> str:
        ranks = self.ranks
        if len(ranks) > 8:
            rank_str = f"[{min(ranks)}..{max(ranks)}, mean {sum(ranks) / len(ranks):.1f}]"
        else:
            rank_str = str(list(ranks))
        comp = "float" if self.comp_bits is None else f"int{self.comp_bits} g{self.comp_group_size}"
        return (
            f"MiLoInt3Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, bits=3, "
            f"group_size={self.group_size}, ranks={rank_str}, compensator={comp}, "
            f"bytes={self.storage_nbytes()}{', transposed' if self.transposed else ''})"
        )

    def _with(self, **changes) -> "MiLoInt3Tensor":
        names, attrs = self.__tensor_flatten__()
        fields = {n: getattr(self, n) for n in names} | dict(attrs)
        fields.update(changes)
        return MiLoInt3Tensor(**fields)

    def _select_expert(self, index: int) -> "MiLoInt3Tensor":
        rank = self.ranks[index]

        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index, :rank]

        return self._with(
            qdata=self.qdata[index], scales=self.scales[index], zeros=self.zeros[index],
            ut=rows(self.ut), v=rows(self.v), ut_scales=rows(self.ut_scales), ut_zeros=rows(self.ut_zeros),
            v_scales=rows(self.v_scales), v_zeros=rows(self.v_zeros),
            shape=tuple(self.shape[1:]), ranks=(rank,),
        )

    # ---- sharding (FSDP2): all-gather of the packed pieces; see milo_tensor/integrations/distributed.py

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """FSDP2 hook: the inner tensors of this dim-0 shard that the all-gather concatenates."""
        from milo_tensor.integrations import distributed

        return distributed.fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """FSDP2 hook: the unsharded MiLoInt3Tensor built on the all-gather outputs."""
        from milo_tensor.integrations import distributed

        return distributed.fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, out=out)


# ---------------------------------------------------------------------- compensator codec


def _encode_compensator(ut, v, dtype, bits, group_size) -> dict[str, torch.Tensor]:
    if bits is None:
        return {"ut": ut.to(dtype), "v": v.to(dtype)}
    out: dict[str, torch.Tensor] = {}
    for name, m in (("ut", ut), ("v", v)):
        q = quantize_compensator(m, bits=bits, group_size=group_size)
        codes = pack_int3(q.codes) if bits == 3 else q.codes.to(torch.uint8)
        out[name] = codes.contiguous()
        out[f"{name}_scales"] = q.scale.to(dtype).contiguous()
        out[f"{name}_zeros"] = q.zero.to(dtype).contiguous()
    return out


def _decode_rows(codes, scales, zeros, bits, group_size) -> torch.Tensor:
    if bits == 3:
        codes = unpack_int3(codes)
    return dequantize_affine(codes, scales, zeros, group_size)


# ---------------------------------------------------------------------- execution

implements = MiLoInt3Tensor.implements
implements_torch_function = MiLoInt3Tensor.implements_torch_function


def _linear(x: torch.Tensor, w: MiLoInt3Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ Wᵀ (+ bias) for a 2D MiLo weight in Linear orientation (N × K)."""
    if w.is_experts:
        raise ValueError(
            f"a 3D expert stack of shape {tuple(w.shape)} is not a Linear weight; index one expert "
            f"(w[e]) or run the experts through the 'milo' experts implementation"
        )
    if x.dtype != w.dtype:
        raise ValueError(
            f"input dtype {x.dtype} does not match the MiLo weight's dtype {w.dtype}; cast the input "
            f"or move the model with .to({x.dtype})"
        )
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"input has {x.shape[-1]} features but the weight expects {w.shape[-1]}")
    ut, v = w.compensator()
    return torch.ops.milo.int3_linear(x, w.qdata, w.scales, w.zeros, ut, v, w.group_size, bias)


def _as_linear_weight(w: torch.Tensor) -> MiLoInt3Tensor | None:
    """The untransposed weight if ``w`` is the (K × N) view Linear hands to mm, else None."""
    if isinstance(w, MiLoInt3Tensor) and w.transposed and not w.is_experts:
        return w._with(transposed=False, shape=tuple(reversed(w.shape)))
    return None


@implements_torch_function(torch.nn.functional.linear)
@implements(aten.linear.default)
def _(func, types, args, kwargs):
    x, w, bias = fill_defaults(args, 3, [None])
    if not isinstance(w, MiLoInt3Tensor) or w.transposed:
        raise NotImplementedError(f"{func}: a MiLoInt3Tensor is supported as the weight argument only")
    return _linear(x, w, bias)


@implements_torch_function([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm])
@implements([aten.mm.default, aten.matmul.default])
def _(func, types, args, kwargs):
    x, w = args[0], args[1]
    weight = _as_linear_weight(w)
    if weight is not None and not isinstance(x, MiLoInt3Tensor):
        return _linear(x, weight, None)
    return func(_dense(x), _dense(w))


@implements_torch_function([torch.addmm, torch.Tensor.addmm])
@implements(aten.addmm.default)
def _(func, types, args, kwargs):
    bias, x, w = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    weight = _as_linear_weight(w)
    if weight is not None and beta == 1 and alpha == 1 and not isinstance(x, MiLoInt3Tensor):
        return _linear(x, weight, None) + bias
    return torch.addmm(_dense(bias), _dense(x), _dense(w), beta=beta, alpha=alpha)


def _dense(t):
    return t.dequantize() if isinstance(t, MiLoInt3Tensor) else t


@implements(aten.t.default)
def _(func, types, args, kwargs):
    w = args[0]
    if w.is_experts:
        raise NotImplementedError("aten.t: a 3D expert stack has no transpose; use transpose(-2, -1)")
    out = w._with(transposed=not w.transposed, shape=tuple(reversed(w.shape)))
    return return_and_correct_aliasing(func, args, kwargs, out)


@implements(aten.transpose.int)
def _(func, types, args, kwargs):
    w, d0, d1 = args[0], args[1] % args[0].ndim, args[2] % args[0].ndim
    if {d0, d1} != {w.ndim - 2, w.ndim - 1}:
        raise NotImplementedError(f"aten.transpose: only the last two dims of a MiLoInt3Tensor swap, got ({args[1]}, {args[2]})")
    shape = (*w.shape[:-2], w.shape[-1], w.shape[-2])
    return return_and_correct_aliasing(func, args, kwargs, w._with(transposed=not w.transposed, shape=shape))


@implements(aten.select.int)
def _(func, types, args, kwargs):
    w, dim, index = args
    if not w.is_experts or dim != 0 or w.transposed:
        raise NotImplementedError(
            f"aten.select: a MiLoInt3Tensor supports selecting one expert (dim 0 of an E x N x K stack); "
            f"got dim={dim} on shape {tuple(w.shape)}"
        )
    n_experts = w.shape[0]
    if not -n_experts <= index < n_experts:
        raise IndexError(f"expert index {index} is out of range for {n_experts} experts")
    return w._select_expert(index % n_experts)


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    w = args[0]
    to = w._get_to_kwargs(*args[1:], **kwargs)
    device, dtype = to["device"], to.get("dtype") or w.dtype
    if not dtype.is_floating_point:
        raise ValueError(f"a MiLoInt3Tensor can move to a floating-point dtype only, got {dtype}")
    names, _ = w.__tensor_flatten__()
    moved = {}
    for name in names:
        t = getattr(w, name).to(device)
        moved[name] = t.to(dtype) if t.dtype.is_floating_point else t
    return w._with(**moved)


@implements(aten.to.dtype_layout)
def _(func, types, args, kwargs):
    device = kwargs.get("device", args[0].device)
    dtype = kwargs.get("dtype", args[0].dtype)
    return args[0].to(device=device, dtype=dtype)


# torch.load(weights_only=True) rebuilds only allow-listed classes; this one holds plain tensors
# and ints, so allowing it keeps state_dict checkpoints loadable without unpickling arbitrary code.
torch.serialization.add_safe_globals([MiLoInt3Tensor])


# ---- sharding (FSDP2 / tensor parallel) ----
# The ops FSDP2 (fully_shard) and DTensor (distribute_tensor, parallelize_module, transformers'
# TP / EP styles, DCP) run on a MiLoInt3Tensor. The slicing rule lives in
# milo_tensor/integrations/distributed.py (imported lazily: it imports this module).

import math as _math  # noqa: E402


def _sharding():
    from milo_tensor.integrations import distributed

    return distributed


@implements(aten.split.Tensor)
def _(func, types, args, kwargs):
    w, split_size, dim = fill_defaults(args, 3, [0])
    return _sharding().split(w, split_size, kwargs.get("dim", dim))


@implements(aten.split_with_sizes.default)
def _(func, types, args, kwargs):
    w, sizes, dim = fill_defaults(args, 3, [0])
    return _sharding().split(w, list(sizes), kwargs.get("dim", dim))


@implements(aten.slice.Tensor)
def _(func, types, args, kwargs):
    w, dim, start, end, step = fill_defaults(args, 5, [0, None, None, 1])
    if step != 1:
        raise NotImplementedError(f"aten.slice: a MiLoInt3Tensor slices with step 1 only, got step={step}")
    size = w.shape[dim]
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else (end + size if end < 0 else end)
    start, end = min(max(start, 0), size), min(max(end, 0), size)
    return _sharding().narrow(w, dim, start, max(end - start, 0))


@implements_torch_function(torch.Tensor.narrow)
def _(func, types, args, kwargs):
    # A narrow over the whole dim is the tensor itself, so that FSDP2's
    # ``padded.narrow(0, 0, n).copy_(shard)`` updates ``padded`` (ranks included) and not a copy.
    w, dim, start, length = fill_defaults(list(args) + [kwargs[k] for k in ("dim", "start", "length") if k in kwargs], 4, [])
    if isinstance(start, torch.Tensor):
        start = int(start)
    if start == 0 and length == w.shape[dim]:
        return w
    return _sharding().narrow(w, dim, start, length)


@implements(aten.cat.default)
def _(func, types, args, kwargs):
    tensors, dim = fill_defaults(args, 2, [0])
    return _sharding().cat(tensors, kwargs.get("dim", dim))


@implements([aten.new_zeros.default, aten.new_empty.default])
def _(func, types, args, kwargs):
    return _sharding().new_zeros(
        args[0], args[1], empty=func is aten.new_empty.default, device=kwargs.get("device"), dtype=kwargs.get("dtype")
    )


@implements(aten.empty_like.default)
def _(func, types, args, kwargs):
    w = args[0]
    return w._apply_fn_to_data(lambda t: torch.empty_like(t, device=kwargs.get("device") or t.device))


@implements(aten.copy_.default)
def _(func, types, args, kwargs):
    return _sharding().copy_into(args[0], args[1])


@implements(aten.view.default)
def _(func, types, args, kwargs):
    w, size = args[0], list(args[1])
    numel = _math.prod(w.shape)
    if -1 in size:
        known = _math.prod(s for s in size if s != -1)
        size[size.index(-1)] = numel // known if known else 0
    if tuple(size) == tuple(w.shape):
        return w._with()
    if size == [numel]:
        # FSDP2 keeps a flat view of a padded shard for bookkeeping (it all-gathers through the
        # fsdp_pre_all_gather hook instead); the packed data has no flat layout to compute with.
        return w._with(shape=(numel,))
    raise NotImplementedError(f"aten.view: a MiLoInt3Tensor of shape {tuple(w.shape)} cannot be viewed as {args[1]}")


@implements(aten.as_strided.default)
def _(func, types, args, kwargs):
    w, size, stride, offset = fill_defaults(args, 4, [None])
    contiguous = tuple(torch.empty(size, device="meta").stride())
    if tuple(size) == tuple(w.shape) and tuple(stride) == contiguous and not offset:
        return w._with()
    raise NotImplementedError(
        f"aten.as_strided: a MiLoInt3Tensor of shape {tuple(w.shape)} supports only its own contiguous layout, "
        f"got size={list(size)} stride={list(stride)} offset={offset}"
    )


@implements(aten.is_pinned.default)
def _(func, types, args, kwargs):
    return all(getattr(args[0], n).is_pinned() for n in args[0].__tensor_flatten__()[0])


@implements(aten._pin_memory.default)
def _(func, types, args, kwargs):
    return args[0]._apply_fn_to_data(lambda t: t.pin_memory())


@implements(torch.ops.c10d.scatter_.default)
def _(func, types, args, kwargs):
    # dist.scatter of MiLo shards (distribute_tensor with src_data_rank set): scatter each inner tensor.
    outputs, inputs, *rest = args
    out = outputs[0]
    works = None
    for name in out.__tensor_flatten__()[0]:
        inner_in = [[getattr(t, name) for t in inputs[0]]] if inputs and inputs[0] else []
        _, works = func([getattr(out, name)], inner_in, *rest)
        works.wait()
    return outputs, works
