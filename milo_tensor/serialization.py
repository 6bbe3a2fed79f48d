"""Saving and loading MiLo-quantized models as safetensors checkpoints (format: milo_tensor/checkpoint.py).

    save_quantized(model, "out/")              # model.safetensors, or shards + model.safetensors.index.json
    model = load_quantized("out/")             # builds the transformers model from out/config.json
    load_quantized("out/", model=skeleton)     # or fills a model you built

Loading never unpickles. The whole checkpoint is validated -- every file, header, checksum, and the
match of every tensor against the target model -- before anything is assigned into the model, so a
corrupt, truncated or mismatched checkpoint raises :class:`CheckpointError` (naming the file and
the tensor) and leaves the model as it was. Saving is atomic: files are written under temporary
names in the target directory and renamed into place with the checkpoint's entry point
(``model.safetensors`` or the index) last, so a crash mid-save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from milo_tensor.checkpoint import (
    CONFIG_NAME,
    DTYPES,
    FLOAT_DTYPES,
    META_DIGEST,
    MILO_SEP,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    TMP_PREFIX,
    CheckpointError,
    CheckpointInfo,
    build_quantized,
    canonical_json,
    current_files,
    fail,
    fsync_dir,
    manifest_entry,
    tensor_nbytes,
    read_checkpoint,
    shard_metadata,
    tensor_digest,
    write_index,
    write_safetensors,
)
from milo_tensor.tensor import MiLoInt3Tensor

__all__ = [
    "CheckpointError",
    "save_quantized",
    "load_quantized",
    "flatten_state_dict",
    "config_to_dict",
    "config_from_dict",
]


# ---------------------------------------------------------------------- the MiLo config as JSON


def config_to_dict(config) -> dict[str, Any]:
    """A JSON-able description of a ``MiLoInt3Config`` (its rank policy included, when it is a built-in)."""
    from milo_tensor.quant.rank import POLICIES

    rank_fn = config.rank_fn
    names = {cls: name for name, cls in POLICIES.items()}
    if type(rank_fn) in names and dataclasses.is_dataclass(rank_fn):
        rank = {"policy": names[type(rank_fn)], **dataclasses.asdict(rank_fn)}
    else:
        rank = {"policy": "custom", "repr": getattr(rank_fn, "__qualname__", None) or repr(rank_fn)}
    return {
        "bits": 3,
        "group_size": config.group_size,
        "iters": config.iters,
        "quantizer": config.quantizer,
        "compensator_bits": config.compensator_bits,
        "compensator_group_size": config.compensator_group_size,
        "rank_fn": rank,
        "skip": list(config.skip),
        "experts_implementation": config.experts_implementation,
    }


def config_from_dict(data: Mapping[str, Any]):
    """The ``MiLoInt3Config`` a :func:`config_to_dict` dict describes (a custom rank policy cannot be rebuilt)."""
    from milo_tensor.config import MiLoInt3Config
    from milo_tensor.quant.rank import get_rank_policy

    rank = dict(data.get("rank_fn") or {"policy": "dense_sparse"})
    policy = rank.pop("policy")
    if policy == "custom":
        raise ValueError(
            f"this config was made with a custom rank policy ({rank.get('repr')}), which cannot be rebuilt from JSON; "
            f"pass the rank_fn yourself"
        )
    kwargs = {k: data[k] for k in ("group_size", "iters", "quantizer", "compensator_bits", "compensator_group_size",
                                   "experts_implementation") if k in data}
    if "skip" in data:
        kwargs["skip"] = tuple(data["skip"])
    return MiLoInt3Config(rank_fn=get_rank_policy(policy, **rank), **kwargs)


# ---------------------------------------------------------------------- flattening


def _param_meta(t: MiLoInt3Tensor, fqn: str) -> dict[str, Any]:
    if t.transposed:
        raise ValueError(f"{fqn}: a transposed MiLoInt3Tensor view is not a parameter; save the module's weight")
    return {
        "shape": [int(s) for s in t.shape],
        "dtype": str(t.dtype).removeprefix("torch."),
        "group_size": int(t.group_size),
        "ranks": [int(r) for r in t.ranks],
        "comp_bits": None if t.comp_bits is None else int(t.comp_bits),
        "comp_group_size": None if t.comp_group_size is None else int(t.comp_group_size),
    }


def flatten_state_dict(model_or_state: nn.Module | Mapping[str, torch.Tensor]):
    """(tensors, params, aliases): the plain tensors a checkpoint stores for a model / state dict.

    ``tensors`` maps stored names to plain tensors (``P.__milo__.<inner>`` for each
    ``MiLoInt3Tensor`` ``P``), ``params`` maps each quantized ``P`` to its attributes, ``aliases``
    maps a tied name to the name stored for it (the same tensor object appears once).
    """
    if isinstance(model_or_state, nn.Module):
        state = model_or_state.state_dict(keep_vars=True)
    else:
        state = dict(model_or_state)
    tensors: dict[str, torch.Tensor] = {}
    params: dict[str, dict[str, Any]] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, value in state.items():
        if value is None:
            continue
        if MILO_SEP in name:
            raise ValueError(f"{name}: a state dict name may not contain {MILO_SEP!r}")
        key = id(value)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        data = value.data if isinstance(value, nn.Parameter) else value
        if isinstance(data, MiLoInt3Tensor):
            params[name] = _param_meta(data, name)
            inner_names, _ = data.__tensor_flatten__()
            for inner in inner_names:
                t = getattr(data, inner)
                if t.numel():  # an empty tensor (rank 0 everywhere) is rebuilt from the attributes
                    tensors[f"{name}{MILO_SEP}{inner}"] = t.detach()
        else:
            if type(data) is not torch.Tensor and not isinstance(data, torch.Tensor):
                raise ValueError(f"{name}: cannot store a {type(data).__name__}")
            tensors[name] = data.detach()
    return tensors, params, aliases
# ---------------------------------------------------------------------- loading into a model


def _resolve_device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def _checkpoint_dtype(info: CheckpointInfo, model_config) -> torch.dtype:
    dtype = getattr(model_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = FLOAT_DTYPES.get(dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    for meta in info.params.values():
        return FLOAT_DTYPES[meta["dtype"]]
    for entry in info.manifest.values():
        if entry[0] in ("F32", "F16", "BF16", "F64"):
            return DTYPES[entry[0]]
    return torch.get_default_dtype()


def _build_model(directory: Path, info: CheckpointInfo) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 -- any failure to read config.json is a checkpoint problem
        raise fail(directory / CONFIG_NAME, f"cannot build the model config: {err}") from err
    # The quantization_config in config.json is ours; the skeleton is a plain float model.
    if hasattr(model_config, "quantization_config"):
        del model_config.quantization_config
    dtype = _checkpoint_dtype(info, model_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    return model


def _materialize_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute non-persistent buffers (rotary tables) of a model built on the meta device."""
    meta_buffers = [(n, b) for n, b in model.named_buffers() if b is not None and b.is_meta]
    if not meta_buffers:
        return
    if not hasattr(model, "_initialize_missing_keys"):
        raise RuntimeError(f"cannot materialize buffers {[n for n, _ in meta_buffers]} of a non-transformers model")
    holders = set()
    for name, buffer in meta_buffers:
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._buffers[leaf] = torch.empty_like(buffer, device=device)
        holders.add(module)
    for module in model.modules():
        if module not in holders:
            module._is_hf_initialized = True
        else:
            module._is_hf_initialized = False
    for p in model.parameters():
        p._is_hf_initialized = True
    model._initialize_missing_keys(is_quantized=True)


def experts_implementation_of(config: Mapping[str, Any] | None) -> str | None:
    """The experts implementation a checkpoint's MiLo config asks for ("milo" unless it says otherwise)."""
    value = (config or {}).get("experts_implementation", "milo")
    return value if value is None or isinstance(value, str) else "milo"


def restore_experts_implementation(model: nn.Module, implementation: str | None = "milo") -> None:
    """Point every experts module whose weights are quantized at the "milo" experts implementation."""
    from milo_tensor.integrations.experts import expert_param_names, use_milo_experts

    if implementation is None:
        return
    for module in model.modules():
        names = expert_param_names(module)
        if names and all(isinstance(getattr(module, n), MiLoInt3Tensor) for n in names):
            use_milo_experts(module, implementation)


def _plan_assignments(model: nn.Module, info: CheckpointInfo, device: torch.device, where: Path):
    """Validate the checkpoint against ``model``; return (plan, ties) to assign, raising on any mismatch."""
    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, value in state.items():
        if value is not None:
            groups.setdefault(id(value), []).append(name)
    stored = set(info.float_names) | set(info.params)
    expected = {n for n, v in state.items() if v is not None}

    def file_of(name):
        return info.location.get(name) or info.location.get(f"{name}{MILO_SEP}qdata") or where

    for name in sorted(stored - expected):
        raise fail(file_of(name), f"extra tensor {name!r}: the model has no such parameter or buffer")
    for alias in sorted(info.aliases):
        if alias not in expected:
            raise fail(where, f"tied name {alias!r}: the model has no such parameter")
    # Names the model ties together take the stored member's tensor (when the checkpoint names one).
    ties: dict[str, str] = {}
    for names in groups.values():
        held = [n for n in names if n in stored]
        for name in names:
            if name not in stored and name not in info.aliases and held:
                ties[name] = held[0]
    for name in sorted(expected - stored - set(info.aliases) - set(ties)):
        raise fail(where, f"missing tensor {name!r}: the model expects it, the checkpoint does not hold it")

    assert info.tensors is not None
    inner_of: dict[str, dict[str, torch.Tensor]] = {}
    for n, t in info.tensors.items():
        if MILO_SEP in n:
            fqn, inner = n.split(MILO_SEP, 1)
            inner_of.setdefault(fqn, {})[inner] = t
    plan = []
    for name in sorted(stored):
        current = state[name]
        if name in info.params:
            meta = info.params[name]
            if tuple(current.shape) != tuple(meta["shape"]) or current.dtype != FLOAT_DTYPES[meta["dtype"]]:
                raise fail(file_of(name), f"tensor {name!r}: stored {meta['dtype']} {meta['shape']}, the model has "
                                           f"{str(current.dtype).removeprefix('torch.')} {list(current.shape)}")
            value = build_quantized(name, meta, inner_of.get(name, {}), device, version=info.version)
        else:
            value = info.tensors[name]
            if tuple(current.shape) != tuple(value.shape) or current.dtype != value.dtype:
                raise fail(file_of(name), f"tensor {name!r}: stored {str(value.dtype).removeprefix('torch.')} "
                                           f"{list(value.shape)}, the model has {str(current.dtype).removeprefix('torch.')} "
                                           f"{list(current.shape)}")
            value = value.to(device)
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        kind = "param" if leaf in module._parameters else "buffer"
        plan.append((name, module, leaf, kind, value))
    return plan, {**ties, **info.aliases}


def load_quantized(directory: str | os.PathLike, model: nn.Module | None = None, device: torch.types.Device = "cpu") -> nn.Module:
    """Load a MiLo checkpoint; validate all of it before touching ``model``.

    With ``model=None`` the transformers model is built from the directory's config.json on the meta
    device and filled. Quantized experts modules get the "milo" experts implementation back, and the
    model can be saved again with ``save_quantized`` or ``save_pretrained``.
    """
    directory = Path(directory)
    device = _resolve_device(device)
    info = read_checkpoint(directory, load=True)
    built = model is None
    if built:
        model = _build_model(directory, info)
    plan, ties = _plan_assignments(model, info, device, info.files[0])
    _run_load_pre_hooks(model, {name: value for name, _, _, _, value in plan})

    # ---- nothing below raises on checkpoint content: assign everything
    assigned: dict[str, torch.Tensor] = {}
    for name, module, leaf, kind, value in plan:
        if kind == "param":
            old = module._parameters[leaf]
            requires_grad = bool(old.requires_grad) and value.is_floating_point() and not isinstance(value, MiLoInt3Tensor)
            new = nn.Parameter(value, requires_grad=requires_grad)
            new._is_hf_initialized = True
            module._parameters[leaf] = new
        else:
            new = value
            module._buffers[leaf] = new
        assigned[name] = new
    for alias, target in ties.items():
        module_name, _, leaf = alias.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf in module._parameters:
            module._parameters[leaf] = assigned[target]
        else:
            module._buffers[leaf] = assigned[target]
    if built or any(b is not None and b.is_meta for b in model.buffers()):
        _materialize_meta_buffers(model, device)
    for module in model.modules():  # as load_state_dict ends: fuse_qkv's stack is rebuilt from the loaded weights
        for hook in module._load_state_dict_post_hooks.values():
            hook(module, nn.modules.module._IncompatibleKeys([], []))
    restore_experts_implementation(model, experts_implementation_of(info.config))
    _attach_quantizer(model, info.config)
    if built:
        model.eval()
    return model


def _run_load_pre_hooks(model: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """The modules' load_state_dict pre-hooks on the planned values, before anything is assigned: parameters are
    assigned directly (not through load_state_dict), and a module that refuses a load (fuse_shared_experts'
    stacks) must refuse this one too."""
    for name, module in model.named_modules():
        if not module._load_state_dict_pre_hooks:
            continue
        prefix = f"{name}." if name else ""
        local = {k: v for k, v in values.items() if k.startswith(prefix)}
        errors: list[str] = []
        for hook in module._load_state_dict_pre_hooks.values():
            hook(local, prefix, {}, True, [], [], errors)
        if errors:
            raise RuntimeError(f"{name or 'the model'}: " + "; ".join(errors))


def _attach_quantizer(model: nn.Module, config: dict | None) -> None:
    try:
        from milo_tensor.integrations.hf_quantizer import attach_hf_quantizer
    except ImportError:  # pragma: no cover - transformers without the quantizer API
        return
    attach_hf_quantizer(model, config)


# ---------------------------------------------------------------------- saving


def parse_size(size: int | str) -> int:
    """Bytes in ``2GB`` / ``500MB`` / ``1GiB`` / ``4096`` (decimal units as in transformers)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read {size!r} as a size (e.g. '2GB', '500MB', 1000000)")
    value, unit = float(match.group(1)), match.group(2).upper()
    scale = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if unit not in scale:
        raise ValueError(f"unknown size unit in {size!r}")
    return int(value * scale[unit])


def _infer_config(params: Mapping[str, dict]) -> dict[str, Any] | None:
    if not params:
        return None

    def common(key):
        values = {meta[key] for meta in params.values()}
        return values.pop() if len(values) == 1 else None

    return {"bits": 3, "group_size": common("group_size"), "compensator_bits": common("comp_bits"),
            "compensator_group_size": common("comp_group_size"), "rank_fn": None}


def model_milo_config(model: nn.Module, params: Mapping[str, dict], config=None) -> dict[str, Any] | None:
    """The MiLo config dict to record: explicit, else the model's quantization_config, else inferred."""
    if config is not None:
        return config if isinstance(config, dict) else config_to_dict(config)
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    milo = getattr(qc, "milo_config", None) if qc is not None else None
    if milo is None and isinstance(qc, dict) and qc.get("quant_method") == "milo":
        milo = qc.get("milo_config")
    return milo if milo is not None else _infer_config(params)


def _units(tensors: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Groups of stored names kept in one shard: the inner tensors of a quantized parameter stay together."""
    groups: dict[str, list[str]] = {}
    for name in tensors:
        groups.setdefault(name.split(MILO_SEP, 1)[0], []).append(name)
    return list(groups.values())


def config_json_for(model: nn.Module, milo_config: dict | None) -> str | None:
    """config.json text for a quantized transformers model (quantization_config set to milo)."""
    model_config = getattr(model, "config", None)
    if model_config is None or not hasattr(model_config, "to_json_string"):
        return None
    from milo_tensor.integrations.hf_quantizer import MiLoHfConfig

    cfg = copy.deepcopy(model_config)
    cfg.quantization_config = MiLoHfConfig(milo_config=milo_config).to_dict()
    dtype = None
    for p in model.parameters():
        if p.is_floating_point():
            dtype = p.dtype
            break
    if dtype is not None:
        cfg.dtype = str(dtype).removeprefix("torch.")
    cfg.architectures = [type(model).__name__]
    return cfg.to_json_string(use_diff=True)


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "2GB",
    config=None,
    write_config: bool = True,
) -> list[Path]:
    """Save a (MiLo-quantized) model as safetensors, atomically. Returns the weight files written.

    ``config``: the ``MiLoInt3Config`` (or its dict) to record; by default the model's
    ``quantization_config``, or what the tensors tell (group size, compensator bits).
    ``write_config``: also write config.json (with ``quantization_config = {"quant_method": "milo"}``)
    and generation_config.json for a transformers model, so ``from_pretrained`` loads the folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    tensors, params, aliases = flatten_state_dict(model)
    tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    milo_config = model_milo_config(model, params, config)
    manifest = {n: manifest_entry(t, tensor_digest(t)) for n, t in tensors.items()}

    shards: list[list[str]] = []
    size = 0
    for unit in _units(tensors):
        unit_size = sum(tensor_nbytes(tensors[n]) for n in unit)
        if not shards or (size + unit_size > limit and size > 0):
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += unit_size
    if not shards:
        shards = [[]]
    metadata = shard_metadata(milo_config, params, manifest, aliases)
    if len(shards) == 1:
        names = [SAFE_WEIGHTS_NAME]
    else:
        # Shard names carry a digest of everything a shard's bytes depend on (tensors, metadata, the
        # split), so a new save never renames over a shard the current checkpoint still uses -- unless
        # that shard is byte-identical -- and the previous checkpoint stays whole until the commit.
        checkpoint_id = hashlib.blake2b(canonical_json([metadata, shards]).encode(), digest_size=4).hexdigest()
        names = [f"model-{checkpoint_id}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    # config.json / generation_config.json are staged before the commit and renamed right after it,
    # so the window where new weights sit beside the old config is two renames wide.
    side_files: dict[str, str] = {}
    if write_config:
        text = config_json_for(model, milo_config)
        if text is not None:
            side_files[CONFIG_NAME] = text
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "to_json_string") and getattr(model, "can_generate", lambda: False)():
            side_files["generation_config.json"] = generation.to_json_string(use_diff=True)

    before = current_files(directory)
    temps: list[Path] = []
    renamed: list[Path] = []
    staged: list[tuple[Path, Path]] = []
    try:
        for name, text in side_files.items():
            tmp = directory / f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
            staged.append((tmp, directory / name))
            temps.append(tmp)
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        for name, shard in zip(names, shards):
            tmp = directory / f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
            temps.append(tmp)
            write_safetensors(tmp, {n: tensors[n] for n in shard}, metadata)
        # Shards of a sharded save have fresh names (the checkpoint id), so renaming them touches
        # nothing the current checkpoint uses; the commit point is the last rename.
        weight_temps = temps[len(staged):]
        for tmp, name in zip(weight_temps, names):
            if name == SAFE_WEIGHTS_NAME:
                continue
            os.replace(tmp, directory / name)
            renamed.append(directory / name)
        if len(names) == 1:
            os.replace(weight_temps[0], directory / SAFE_WEIGHTS_NAME)  # commit
        else:
            weight_map = {n: file for file, shard in zip(names, shards) for n in shard}
            digests = {name: metadata[META_DIGEST] for name in names}
            write_index(directory, weight_map, sum(tensor_nbytes(t) for t in tensors.values()), digests)  # commit ...
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / SAFE_WEIGHTS_NAME)  # ... which takes effect once model.safetensors is gone
        for tmp, final in staged:
            os.replace(tmp, final)
        fsync_dir(directory)
    except BaseException:
        for path in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for path in renamed:
            if path.name not in before:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        raise

    # Committed: drop the previous checkpoint's files that the new one does not use.
    keep = set(names) | ({SAFE_WEIGHTS_INDEX_NAME} if len(names) > 1 else set())
    for name in before - keep:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / name)
    return [directory / n for n in names]
