"""``MiLoInt3Config`` / ``milo_int3``: the torchao config, its module handler and the model walk.

torchao's ``quantize_`` visits only ``nn.Linear`` with its default filter, so the 3D expert weights
of transformers 5 MoE blocks need a filter that also selects experts modules:
:func:`milo_tensor.quantize_` passes one (and draws a progress bar over the weights); with torchao's
own ``quantize_`` pass ``filter_fn=milo_tensor.is_milo_target``, or use ``FqnToConfig``.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization import FqnToConfig
from torchao.quantization import quantize_ as torchao_quantize_
from torchao.quantization.transform_module import register_quantize_module_handler
from tqdm.auto import tqdm

from milo_tensor.integrations.experts import check_supported_experts, expert_param_names, use_milo_experts
from milo_tensor.quant.rank import DenseSparseRank, WeightInfo, assign_ranks, get_rank_policy
from milo_tensor.tensor import MiLoInt3Tensor

__all__ = ["MiLoInt3Config", "milo_int3", "quantize_", "is_milo_target", "milo_target_weights", "DEFAULT_SKIP"]

# Linear layers left in float by default: the output head and routers that are plain Linear.
DEFAULT_SKIP = (r"(^|\.)lm_head$", r"(^|\.)shared_experts?_gate$", r"(^|\.)router$", r"(^|\.)gate$")

_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
_GROUP_SIZES = (32, 64, 128)


def _default_rank_fn() -> DenseSparseRank:
    return DenseSparseRank(dense_rank=64, sparse_rank=16)


@dataclass
class MiLoInt3Config(AOBaseConfig):
    """3-bit group-wise weights plus a low-rank compensator chosen by ``rank_fn``.

    Args:
        rank_fn: a rank policy (``ConstantRank``, ``DenseSparseRank``, ``KurtosisRank``,
            ``EnergyRank``), a policy name, an int (constant rank) or a callable
            ``(WeightInfo) -> int``.
        group_size: quantization group along the input dim (32, 64 or 128).
        iters: MiLo alternations between quantizing and refitting the compensator.
        quantizer: "hqq" (half-quadratic solver) or "rtn".
        compensator_bits: None keeps U and V in the weight dtype; 8 or 3 quantizes them.
        compensator_group_size: group size of the quantized compensator.
        skip: regexes of Linear-layer names left in float.
        experts_implementation: transformers experts implementation set on quantized experts
            modules ("milo" runs the grouped op; None leaves the model's choice alone).
    """

    rank_fn: object = field(default_factory=_default_rank_fn)
    group_size: int = 64
    iters: int = 20
    quantizer: str = "hqq"
    compensator_bits: int | None = None
    compensator_group_size: int = 64
    skip: tuple[str, ...] = DEFAULT_SKIP
    experts_implementation: str | None = "milo"

    def __post_init__(self) -> None:
        if self.group_size not in _GROUP_SIZES:
            raise ValueError(f"group_size must be one of {_GROUP_SIZES}, got {self.group_size}")
        if self.iters < 0:
            raise ValueError(f"iters must be >= 0, got {self.iters}")
        if self.quantizer not in ("hqq", "rtn"):
            raise ValueError(f"quantizer must be 'hqq' or 'rtn', got {self.quantizer!r}")
        if self.compensator_bits not in (None, 8, 3):
            raise ValueError(f"compensator_bits must be None, 8 or 3, got {self.compensator_bits!r}")
        if self.compensator_bits is not None and self.compensator_group_size % 32:
            raise ValueError(f"compensator_group_size must be a multiple of 32, got {self.compensator_group_size}")
        self.rank_fn = get_rank_policy(self.rank_fn)


def milo_int3(
    rank_fn: object = None,
    *,
    group_size: int = 64,
    iters: int = 20,
    quantizer: str = "hqq",
    compensator_bits: int | None = None,
    compensator_group_size: int = 64,
    skip: tuple[str, ...] = DEFAULT_SKIP,
    experts_implementation: str | None = "milo",
) -> MiLoInt3Config:
    """The MiLo int3 config; ``rank_fn=None`` gives dense rank 64 / routed-expert rank 16."""
    return MiLoInt3Config(
        rank_fn=_default_rank_fn() if rank_fn is None else rank_fn,
        group_size=group_size,
        iters=iters,
        quantizer=quantizer,
        compensator_bits=compensator_bits,
        compensator_group_size=compensator_group_size,
        skip=tuple(skip),
        experts_implementation=experts_implementation,
    )


# ---------------------------------------------------------------------- the model walk

# Fully-qualified names of modules, recorded when they are selected, so rank policies get them
# (torchao's handlers receive the module only).
_MODULE_FQNS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_PROGRESS: contextvars.ContextVar[tqdm | None] = contextvars.ContextVar("milo_progress", default=None)


def _is_target(module: nn.Module, fqn: str, skip: tuple[str, ...]) -> bool:
    if isinstance(module, nn.Linear):
        if any(re.search(p, fqn) for p in skip) or isinstance(module.weight, MiLoInt3Tensor):
            return False
    elif not expert_param_names(module) or any(
        isinstance(getattr(module, n), MiLoInt3Tensor) for n in expert_param_names(module)
    ):
        return False
    _MODULE_FQNS[module] = fqn
    return True


def make_filter(skip: tuple[str, ...] = DEFAULT_SKIP) -> Callable[[nn.Module, str], bool]:
    """A torchao filter_fn selecting Linear layers (minus ``skip``) and transformers experts modules."""
    return lambda module, fqn="": _is_target(module, fqn, skip)


is_milo_target = make_filter()
is_milo_target.__doc__ = "torchao filter_fn: Linear layers (not lm_head/routers) and 3D experts modules."


def _targets(model: nn.Module, filter_fn, prefix: str = "") -> Iterator[nn.Module]:
    """Modules ``quantize_`` will hand to the handler (it stops descending at a match)."""
    if filter_fn(model, prefix):
        yield model
        return
    for name, child in model.named_children():
        yield from _targets(child, filter_fn, f"{prefix}.{name}" if prefix else name)


def milo_target_weights(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> list[str]:
    """Fully-qualified names of the parameters ``quantize_`` would replace, so baselines that
    are not MiLo (e.g. a 4-bit fake quantization) can touch exactly the same weights."""
    names = []
    for module in _targets(model, make_filter(skip)):
        fqn = _MODULE_FQNS[module]
        local = ["weight"] if isinstance(module, nn.Linear) else expert_param_names(module)
        names += [f"{fqn}.{n}" if fqn else n for n in local]
    return names


def _weights_in(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.Linear) else len(expert_param_names(module))


@contextlib.contextmanager
def _progress(total: int | None, enabled: bool):
    bar = tqdm(total=total, desc="MiLo int3", unit="weight", disable=not enabled)
    token = _PROGRESS.set(bar)
    try:
        yield bar
    finally:
        _PROGRESS.reset(token)
        bar.close()


def quantize_(
    model: nn.Module,
    config: AOBaseConfig | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    device: torch.types.Device | None = None,
    *,
    progress: bool = True,
) -> None:
    """torchao's ``quantize_`` with a filter that reaches MoE experts, and a progress bar.

    ``config`` defaults to ``milo_int3()``; an ``FqnToConfig`` is passed through unchanged.
    """
    config = milo_int3() if config is None else config
    for name, module in model.named_modules():
        _MODULE_FQNS[module] = name
    if isinstance(config, FqnToConfig):
        with _progress(None, progress):
            torchao_quantize_(model, config, filter_fn=None, device=device)
        return
    skip = config.skip if isinstance(config, MiLoInt3Config) else DEFAULT_SKIP
    filter_fn = filter_fn or make_filter(skip)
    total = sum(_weights_in(m) for m in _targets(model, filter_fn))
    if total == 0:
        warnings.warn(
            "milo_tensor.quantize_: no weight to quantize (the model is already quantized, or it has no "
            "nn.Linear / experts module outside config.skip)", stacklevel=2,
        )
    with _progress(total, progress and total > 0):
        torchao_quantize_(model, config, filter_fn=filter_fn, device=device)


# ---------------------------------------------------------------------- the handler


def _infos(fqn: str, weight: torch.Tensor, is_expert_stack: bool) -> list[WeightInfo]:
    if is_expert_stack:
        return [
            WeightInfo(fqn=fqn, kind="expert", expert=e, shape=tuple(weight.shape[1:]), weight=weight[e])
            for e in range(weight.shape[0])
        ]
    match = _EXPERT_INDEX.search(fqn)
    kind, expert = ("expert", int(match.group(1))) if match else ("dense", None)
    return [WeightInfo(fqn=fqn, kind=kind, expert=expert, shape=tuple(weight.shape), weight=weight)]


def _quantize_parameter(module: nn.Module, name: str, module_fqn: str, config: MiLoInt3Config) -> None:
    weight = getattr(module, name)
    fqn = f"{module_fqn}.{name}" if module_fqn else name
    if isinstance(weight, MiLoInt3Tensor):
        return
    is_stack = weight.ndim == 3
    if weight.ndim not in (2, 3):
        raise ValueError(f"{fqn}: MiLo quantizes 2D or 3D weights, got shape {tuple(weight.shape)}")
    ranks = assign_ranks(config.rank_fn, _infos(fqn, weight.detach(), is_stack))
    try:
        qweight = MiLoInt3Tensor.from_float(
            weight.detach(),
            ranks if is_stack else ranks[0],
            group_size=config.group_size,
            iters=config.iters,
            quantizer=config.quantizer,
            comp_bits=config.compensator_bits,
            comp_group_size=config.compensator_group_size,
        )
    except ValueError as err:
        raise ValueError(f"cannot quantize {fqn} ({type(module).__name__}): {err}") from err
    setattr(module, name, nn.Parameter(qweight, requires_grad=False))
    bar = _PROGRESS.get()
    if bar is not None:
        bar.set_postfix_str(fqn, refresh=False)
        bar.update(1)


@register_quantize_module_handler(MiLoInt3Config)
def _milo_int3_transform(module: nn.Module, config: MiLoInt3Config, *, parameter_name: str | None = None) -> nn.Module:
    fqn = _MODULE_FQNS.get(module, "")
    expert_names = expert_param_names(module)
    if expert_names:
        check_supported_experts(module, fqn)
        for name in expert_names if parameter_name is None else (parameter_name,):
            _quantize_parameter(module, name, fqn, config)
        if config.experts_implementation is not None and all(
            isinstance(getattr(module, n), MiLoInt3Tensor) for n in expert_names
        ):
            use_milo_experts(module, config.experts_implementation)
    elif isinstance(module, nn.Linear) or parameter_name is not None:
        _quantize_parameter(module, parameter_name or "weight", fqn, config)
    else:
        raise ValueError(
            f"MiLo cannot quantize {fqn or type(module).__name__} ({type(module).__name__}): it is neither an "
            f"nn.Linear nor a transformers experts module with 3D gate_up_proj/down_proj weights"
        )
    return module
