"""safetensors checkpoints of MiLo-quantized models (the on-disk format is in docs/format.md).

    save_quantized(model, "out/")              # model.safetensors, or shards + model.safetensors.index.json
    model = load_quantized("out/")             # builds the transformers model from out/config.json
    load_quantized("out/", model=skeleton)     # or fills a model you built

A ``MiLoInt3Tensor`` parameter ``P`` is stored as its plain inner tensors ``P.__milo__.qdata``,
``P.__milo__.scales``, ... (``__tensor_flatten__``); its attributes (logical shape, group size,
per-expert ranks, compensator bits / group size, dtype), the format version, the MiLo config and a
manifest of every tensor (dtype, shape, blake2b of its bytes) live in the safetensors header's
``__metadata__``. Float parameters and persistent buffers are stored as they are.

Loading never unpickles. Every file is validated completely -- header, offsets, manifest, the
expected shape and dtype of each inner tensor, checksums of the bytes, missing or extra tensors,
the match against the target model -- before anything is assigned into the model, so a corrupt,
truncated or mismatched checkpoint raises :class:`CheckpointError` (naming the file and the
tensor) and leaves the model as it was. Saving is atomic: everything is written to temporary files
in the target directory, then renamed into place with the checkpoint's entry point (``model.safetensors``
or the index) last, so a crash mid-save leaves the previous checkpoint whole.

The files are ordinary safetensors (any safetensors reader opens them), written by this module
rather than the ``safetensors`` package so that the bytes are deterministic (the package orders the
header's metadata by hash) -- ``milo quantize`` relies on that for byte-identical resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from milo_tensor.quant.packing import FORMAT_VERSION
from milo_tensor.tensor import MiLoInt3Tensor

__all__ = [
    "CheckpointError",
    "save_quantized",
    "load_quantized",
    "verify_checkpoint",
    "flatten_state_dict",
    "config_to_dict",
    "config_from_dict",
    "SUPPORTED_FORMAT_VERSIONS",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MILO_SEP = ".__milo__."
SUPPORTED_FORMAT_VERSIONS = (1,)
TMP_PREFIX = ".milo-tmp-"

# Header metadata keys (values are JSON strings; safetensors metadata is str -> str).
META_FORMAT = "format"  # "pt", what transformers expects
META_VERSION = "milo_format_version"
META_CONFIG = "milo_config"
META_PARAMS = "milo_params"
META_MANIFEST = "milo_manifest"
META_ALIASES = "milo_aliases"
META_UNIT = "milo_unit"  # written by `milo quantize` (streaming): which layer a shard holds
META_STATS = "milo_stats"  # written by `milo quantize`: per-weight error / ranks for its summary
META_DIGEST = "milo_metadata_digest"  # blake2b over every other milo_* metadata value

_HEADER_LIMIT = 100 * 1024 * 1024
_DIGEST_SIZE = 16
_ALIGN = 64
_READ_CHUNK = 64 * 1024 * 1024

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_FLOAT_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_INNER_REQUIRED = ("qdata", "scales", "zeros", "ut", "v")
_INNER_COMP_QPARAMS = ("ut_scales", "ut_zeros", "v_scales", "v_zeros")
INNER_NAMES = _INNER_REQUIRED + _INNER_COMP_QPARAMS


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: corrupt, truncated, of an unknown version, or not matching the model."""


def _fail(where: str | os.PathLike, message: str) -> CheckpointError:
    return CheckpointError(f"{os.fspath(where)}: {message}")


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


def _expected_inner(fqn: str, meta: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The stored (shape, dtype) of every inner tensor of a quantized parameter, from its attributes.

    Raises CheckpointError-free ValueError on inconsistent attributes (callers add the file name).
    """
    shape = meta["shape"]
    dtype = _FLOAT_DTYPES[meta["dtype"]]
    g, ranks, cb, cg = meta["group_size"], meta["ranks"], meta["comp_bits"], meta["comp_group_size"]
    if len(shape) not in (2, 3):
        raise ValueError(f"{fqn}: a quantized weight is 2D or 3D, got shape {shape}")
    lead = tuple(shape[:-2])
    n, k = shape[-2:]
    n_experts = shape[0] if len(shape) == 3 else 1
    if len(ranks) != n_experts:
        raise ValueError(f"{fqn}: {len(ranks)} ranks for {n_experts} expert(s)")
    if g not in (32, 64, 128) or k % 32 or k % g or n <= 0 or k <= 0:
        raise ValueError(f"{fqn}: group size {g} does not fit shape {shape}")
    if any(r < 0 or r > min(n, k) for r in ranks):
        raise ValueError(f"{fqn}: ranks {ranks} outside [0, {min(n, k)}]")
    r = max(ranks) if ranks else 0
    spec = {
        "qdata": (lead + (n, 3 * k // 32), torch.int32),
        "scales": (lead + (n, k // g), dtype),
        "zeros": (lead + (n, k // g), dtype),
    }
    if cb is None:
        if cg is not None:
            raise ValueError(f"{fqn}: a float compensator has no compensator group size, got {cg}")
        spec["ut"] = (lead + (r, n), dtype)
        spec["v"] = (lead + (r, k), dtype)
    elif cb in (8, 3):
        if not isinstance(cg, int) or cg <= 0 or cg % 32 or n % cg or k % cg:
            raise ValueError(f"{fqn}: compensator group size {cg} does not fit shape {shape}")
        if cb == 8:
            spec["ut"] = (lead + (r, n), torch.uint8)
            spec["v"] = (lead + (r, k), torch.uint8)
        else:
            if n % 32:
                raise ValueError(f"{fqn}: an int3 compensator needs N % 32 == 0, got N={n}")
            spec["ut"] = (lead + (r, 3 * n // 32), torch.int32)
            spec["v"] = (lead + (r, 3 * k // 32), torch.int32)
        spec["ut_scales"] = (lead + (r, n // cg), dtype)
        spec["ut_zeros"] = (lead + (r, n // cg), dtype)
        spec["v_scales"] = (lead + (r, k // cg), dtype)
        spec["v_zeros"] = (lead + (r, k // cg), dtype)
    else:
        raise ValueError(f"{fqn}: compensator bits must be null, 8 or 3, got {cb!r}")
    return spec


def _check_param_meta(fqn: str, meta: Any) -> dict[str, Any]:
    """Type-check one entry of ``milo_params`` (JSON from a file: trust nothing)."""

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if not isinstance(meta, dict) or set(meta) != {"shape", "dtype", "group_size", "ranks", "comp_bits", "comp_group_size"}:
        raise ValueError(f"{fqn}: malformed attributes {meta!r}")
    if not isinstance(meta["shape"], list) or not all(is_int(s) and s >= 0 for s in meta["shape"]):
        raise ValueError(f"{fqn}: malformed shape {meta['shape']!r}")
    if meta["dtype"] not in _FLOAT_DTYPES:
        raise ValueError(f"{fqn}: unsupported dtype {meta['dtype']!r}")
    if not is_int(meta["group_size"]):
        raise ValueError(f"{fqn}: malformed group size {meta['group_size']!r}")
    if not isinstance(meta["ranks"], list) or not all(is_int(r) for r in meta["ranks"]):
        raise ValueError(f"{fqn}: malformed ranks {meta['ranks']!r}")
    for key in ("comp_bits", "comp_group_size"):
        if meta[key] is not None and not is_int(meta[key]):
            raise ValueError(f"{fqn}: malformed {key} {meta[key]!r}")
    _expected_inner(fqn, meta)
    return meta


# ---------------------------------------------------------------------- the safetensors file itself


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_digest(t: torch.Tensor) -> str:
    """blake2b-128 (hex) of a tensor's bytes as stored (row-major, little-endian)."""
    return hashlib.blake2b(_tensor_bytes(t), digest_size=_DIGEST_SIZE).hexdigest()


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _manifest_entry(t: torch.Tensor, digest: str) -> list:
    return [_DTYPE_NAMES[t.dtype], [int(s) for s in t.shape], digest]


def _write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> int:
    """Write a safetensors file with a deterministic header; fsync it. Returns its size in bytes."""
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
    # The data starts on a 64-byte boundary; tensors whose size is a multiple of 64 bytes come first
    # (each stays 64-byte aligned when the file is memory-mapped, so SIMD kernels take the same path
    # as on freshly allocated tensors), then the rest by decreasing element size (each stays aligned
    # to its element size, as safetensors does).
    order = sorted(tensors, key=lambda n: (_nbytes(tensors[n]) % _ALIGN != 0, -tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": [int(s) for s in t.shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % _ALIGN)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in order:
            fh.write(_tensor_bytes(tensors[name]))
        fh.flush()
        os.fsync(fh.fileno())
    return 8 + len(raw) + offset


@dataclass
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class _Header:
    path: Path
    metadata: dict[str, str]
    entries: dict[str, _Entry]
    data_start: int


def _read_header(path: Path) -> _Header:
    """Parse and validate a safetensors header (never trusting a length or an offset)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"truncated: {size} bytes, not even a header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > _HEADER_LIMIT or 8 + n > size:
                raise _fail(path, f"bad header length {n} for a file of {size} bytes (truncated or corrupt)")
            raw = fh.read(n)
    except OSError as err:
        raise _fail(path, f"cannot read: {err}") from err
    if len(raw) != n:
        raise _fail(path, "truncated header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise _fail(path, f"corrupt header (not JSON): {err}") from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _fail(path, "corrupt header: __metadata__ is not a str -> str map")
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"tensor {name!r}: malformed header entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise _fail(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise _fail(path, f"tensor {name!r}: malformed shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise _fail(path, f"tensor {name!r}: malformed data_offsets {offsets!r}")
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=_DTYPES[dtype]).element_size()
        if offsets[1] - offsets[0] != numel * itemsize:
            raise _fail(path, f"tensor {name!r}: data_offsets {offsets} do not hold a {dtype} tensor of shape {shape}")
        entries[name] = _Entry(dtype, tuple(shape), offsets[0], offsets[1])
    data_len = size - 8 - n
    position = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start != position:
            raise _fail(path, f"tensor {name!r}: data_offsets {[e.start, e.end]} leave a gap or overlap at byte {position}")
        position = e.end
    if position != data_len:
        what = "truncated" if position > data_len else "has trailing bytes"
        raise _fail(path, f"{what}: the header describes {position} data bytes, the file holds {data_len}")
    return _Header(path, metadata, entries, 8 + n)


def _read_tensor(fh, header: _Header, name: str) -> torch.Tensor:
    e = header.entries[name]
    nbytes = e.end - e.start
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        fh.seek(header.data_start + e.start)
        view = memoryview(buf.numpy())
        got = 0
        while got < nbytes:
            count = fh.readinto(view[got:])
            if not count:
                raise _fail(header.path, f"tensor {name!r}: truncated data")
            got += count
    return buf.view(_DTYPES[e.dtype]).reshape(e.shape)


def _digest_from_file(fh, header: _Header, name: str) -> str:
    e = header.entries[name]
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    fh.seek(header.data_start + e.start)
    left = e.end - e.start
    while left:
        chunk = fh.read(min(left, _READ_CHUNK))
        if not chunk:
            raise _fail(header.path, f"tensor {name!r}: truncated data")
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------- reading a checkpoint


@dataclass
class CheckpointInfo:
    """A validated checkpoint: its files and what they hold (tensor data loaded only on request)."""

    directory: Path
    files: list[Path]
    version: int
    config: dict[str, Any] | None
    params: dict[str, dict[str, Any]]  # quantized parameter -> attributes
    manifest: dict[str, list]  # stored tensor -> [dtype, shape, digest]
    aliases: dict[str, str]
    location: dict[str, Path]  # stored tensor -> file
    headers: dict[Path, _Header] = field(repr=False, default_factory=dict)
    tensors: dict[str, torch.Tensor] | None = field(repr=False, default=None)

    @property
    def float_names(self) -> list[str]:
        return [n for n in self.manifest if MILO_SEP not in n]


def _checkpoint_files(directory: Path) -> tuple[list[Path], dict[str, str] | None, dict[str, Any]]:
    """The weight files of a directory: model.safetensors wins over an index (as in transformers)."""
    single = directory / SAFE_WEIGHTS_NAME
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if single.is_file():
        return [single], None, {}
    if not index.is_file():
        if not directory.is_dir():
            raise _fail(directory, "no such checkpoint directory")
        raise _fail(directory, f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise _fail(index, f"corrupt index: {err}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise _fail(index, "corrupt index: no weight_map of tensor name -> file name")
    meta = data.get("metadata") or {}
    if not isinstance(meta, dict):
        raise _fail(index, "corrupt index: metadata is not an object")
    names = sorted(set(weight_map.values()))
    for name in names:
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise _fail(index, f"weight_map names a file outside the checkpoint: {name!r}")
        if not (directory / name).is_file():
            raise _fail(directory / name, "missing shard (listed in the index)")
    return [directory / n for n in names], weight_map, meta


def _load_json_meta(path: Path, metadata: Mapping[str, str], key: str, kind: type, required: bool = True):
    if key not in metadata:
        if required:
            raise _fail(path, f"header metadata lacks {key!r}: not a MiLo checkpoint, or a corrupt one")
        return None
    try:
        value = json.loads(metadata[key])
    except (json.JSONDecodeError, RecursionError) as err:
        raise _fail(path, f"corrupt header metadata {key!r}: {err}") from None
    if not isinstance(value, kind):
        raise _fail(path, f"corrupt header metadata {key!r}: expected a JSON {kind.__name__}")
    return value


def _parse_version(path: Path, metadata: Mapping[str, str]) -> int:
    raw = metadata.get(META_VERSION)
    if raw is None:
        raise _fail(path, f"header metadata lacks {META_VERSION!r}: not a MiLo checkpoint")
    if not re.fullmatch(r"[0-9]{1,9}", raw):
        raise _fail(path, f"unknown MiLo format version {raw!r}")
    version = int(raw)
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise _fail(path, f"unknown MiLo format version {version} (this milo_tensor reads {list(SUPPORTED_FORMAT_VERSIONS)}); "
                          f"upgrade milo_tensor")
    return version


def read_checkpoint(directory: str | os.PathLike, *, load: bool = True, verify_data: bool = True) -> CheckpointInfo:
    """Validate a checkpoint directory completely; with ``load``, return its tensors (on CPU) too."""
    directory = Path(directory)
    files, weight_map, _ = _checkpoint_files(directory)
    headers = {p: _read_header(p) for p in files}

    version = None
    config: dict | None = None
    config_seen = False
    params: dict[str, dict] = {}
    manifest: dict[str, list] = {}
    aliases: dict[str, str] | None = None
    location: dict[str, Path] = {}
    for path, header in headers.items():
        md = header.metadata
        v = _parse_version(path, md)
        if md.get(META_DIGEST) != metadata_digest(md):
            raise _fail(path, "corrupt header metadata (its digest does not match)")
        if version is not None and v != version:
            raise _fail(path, f"format version {v} differs from {version} of the other shards")
        version = v
        cfg = _load_json_meta(path, md, META_CONFIG, (dict, type(None)))
        if config_seen and cfg != config:
            raise _fail(path, "its MiLo config differs from the other shards' (shards of different checkpoints?)")
        config, config_seen = cfg, True
        file_params = _load_json_meta(path, md, META_PARAMS, dict)
        for fqn, meta in file_params.items():
            try:
                meta = _check_param_meta(fqn, meta)
            except (ValueError, KeyError, TypeError) as err:
                raise _fail(path, f"tensor {fqn!r}: {err}") from None
            if fqn in params and params[fqn] != meta:
                raise _fail(path, f"tensor {fqn!r}: attributes differ from another shard's")
            params[fqn] = meta
        file_manifest = _load_json_meta(path, md, META_MANIFEST, dict)
        for name, entry in file_manifest.items():
            if (not isinstance(entry, list) or len(entry) != 3 or entry[0] not in _DTYPES
                    or not isinstance(entry[1], list) or not isinstance(entry[2], str)):
                raise _fail(path, f"tensor {name!r}: malformed manifest entry {entry!r}")
            if name in manifest and manifest[name] != entry:
                raise _fail(path, f"tensor {name!r}: manifest entry differs from another shard's (mixed checkpoints?)")
            manifest[name] = entry
        file_aliases = _load_json_meta(path, md, META_ALIASES, dict, required=False) or {}
        if aliases is not None and file_aliases != aliases:
            raise _fail(path, "its tied-weight aliases differ from the other shards'")
        aliases = file_aliases
    for path, header in headers.items():
        for name, e in header.entries.items():
            if name in location:
                raise _fail(path, f"tensor {name!r} is stored twice (also in {location[name].name})")
            location[name] = path
            if weight_map is not None and weight_map.get(name) != path.name:
                raise _fail(path, f"tensor {name!r} is not listed for this file in {SAFE_WEIGHTS_INDEX_NAME}")
            if name not in manifest:
                raise _fail(path, f"extra tensor {name!r}: not in the checkpoint's manifest")
            expected = manifest[name]
            if [e.dtype, list(e.shape)] != [expected[0], expected[1]]:
                raise _fail(path, f"tensor {name!r}: header says {e.dtype} {list(e.shape)}, the manifest "
                                  f"{expected[0]} {expected[1]} (corrupt header)")
    assert version is not None
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in location:
                raise _fail(directory / fname, f"missing tensor {name!r} (listed in the index)")
    for name in manifest:
        if name not in location:
            raise _fail(files[0] if len(files) == 1 else directory, f"missing tensor {name!r} (in the manifest, in no file)")

    # Quantized parameters: exactly their expected inner tensors, each of the expected shape / dtype.
    grouped: dict[str, set[str]] = {}
    for name in location:
        if MILO_SEP in name:
            fqn, inner = name.split(MILO_SEP, 1)
            if fqn not in params:
                raise _fail(location[name], f"extra tensor {name!r}: {fqn!r} is not a quantized parameter of this checkpoint")
            grouped.setdefault(fqn, set()).add(inner)
    for fqn, meta in params.items():
        spec = _expected_inner(fqn, meta)
        have = grouped.get(fqn, set())
        where = location.get(f"{fqn}{MILO_SEP}qdata", files[0])
        for inner in sorted(set(spec) - have):
            if _numel(spec[inner][0]) == 0:
                continue  # empty inner tensors need not be stored
            raise _fail(where, f"missing tensor {fqn}{MILO_SEP}{inner}")
        for inner in sorted(have - set(spec)):
            raise _fail(location[f"{fqn}{MILO_SEP}{inner}"], f"extra tensor {fqn}{MILO_SEP}{inner}")
        for inner, (shape, dtype) in spec.items():
            name = f"{fqn}{MILO_SEP}{inner}"
            if name not in location:
                continue
            e = headers[location[name]].entries[name]
            if e.shape != shape or _DTYPES[e.dtype] != dtype:
                raise _fail(location[name], f"tensor {name!r}: stored {e.dtype} {list(e.shape)}, expected "
                                            f"{_DTYPE_NAMES[dtype]} {list(shape)} for {fqn}'s attributes")
        if fqn in location:
            raise _fail(location[fqn], f"tensor {fqn!r} is stored both quantized and in float")
    for alias, target in (aliases or {}).items():
        if not isinstance(target, str) or alias in location or alias in params:
            raise _fail(directory, f"tied name {alias!r} is stored as well (corrupt aliases)")
        if target not in location and target not in params:
            raise _fail(directory, f"tied name {alias!r} points at {target!r}, which is not stored")

    info = CheckpointInfo(directory, files, version, config, params, manifest, aliases or {}, location, headers)
    if load or verify_data:
        tensors: dict[str, torch.Tensor] = {}
        for path, header in headers.items():
            try:
                with open(path, "rb") as fh:
                    for name in header.entries:
                        if load:
                            t = _read_tensor(fh, header, name)
                            digest = tensor_digest(t)
                            tensors[name] = t
                        else:
                            digest = _digest_from_file(fh, header, name)
                        if digest != manifest[name][2]:
                            raise _fail(path, f"tensor {name!r}: checksum mismatch (corrupt data)")
            except OSError as err:
                raise _fail(path, f"cannot read: {err}") from err
        info.tensors = tensors if load else None
    return info


def verify_checkpoint(directory: str | os.PathLike) -> CheckpointInfo:
    """Validate every file, header and checksum of a checkpoint without keeping its tensors."""
    return read_checkpoint(directory, load=False, verify_data=True)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def build_quantized(fqn: str, meta: Mapping[str, Any], inner: Mapping[str, torch.Tensor],
                    device: torch.types.Device = None) -> MiLoInt3Tensor:
    """The MiLoInt3Tensor of a quantized parameter from its stored inner tensors and attributes."""
    fields = {}
    for name, (shape, dtype) in _expected_inner(fqn, meta).items():
        t = inner.get(name)
        if t is None:
            if _numel(shape):
                raise KeyError(f"{fqn}: inner tensor {name!r} missing")
            t = torch.empty(shape, dtype=dtype)
        fields[name] = t if device is None else t.to(device)
    return MiLoInt3Tensor(
        **fields,
        shape=tuple(meta["shape"]),
        group_size=meta["group_size"],
        ranks=tuple(meta["ranks"]),
        comp_bits=meta["comp_bits"],
        comp_group_size=meta["comp_group_size"],
    )


# ---------------------------------------------------------------------- loading into a model


def _resolve_device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def _checkpoint_dtype(info: CheckpointInfo, model_config) -> torch.dtype:
    dtype = getattr(model_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = _FLOAT_DTYPES.get(dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    for meta in info.params.values():
        return _FLOAT_DTYPES[meta["dtype"]]
    for name, entry in info.manifest.items():
        if entry[0] in ("F32", "F16", "BF16", "F64"):
            return _DTYPES[entry[0]]
    return torch.get_default_dtype()


def _build_model(directory: Path, info: CheckpointInfo) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 -- any failure to read config.json is a checkpoint problem
        raise _fail(directory / CONFIG_NAME, f"cannot build the model config: {err}") from err
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
        raise _fail(file_of(name), f"extra tensor {name!r}: the model has no such parameter or buffer")
    for alias in sorted(info.aliases):
        if alias not in expected:
            raise _fail(where, f"tied name {alias!r}: the model has no such parameter")
    # Names the model ties together take the stored member's tensor (when the checkpoint names one).
    ties: dict[str, str] = {}
    for names in groups.values():
        held = [n for n in names if n in stored]
        for name in names:
            if name not in stored and name not in info.aliases and held:
                ties[name] = held[0]
    for name in sorted(expected - stored - set(info.aliases) - set(ties)):
        raise _fail(where, f"missing tensor {name!r}: the model expects it, the checkpoint does not hold it")

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
            if tuple(current.shape) != tuple(meta["shape"]) or current.dtype != _FLOAT_DTYPES[meta["dtype"]]:
                raise _fail(file_of(name), f"tensor {name!r}: stored {meta['dtype']} {meta['shape']}, the model has "
                                           f"{str(current.dtype).removeprefix('torch.')} {list(current.shape)}")
            value = build_quantized(name, meta, inner_of.get(name, {}), device)
        else:
            value = info.tensors[name]
            if tuple(current.shape) != tuple(value.shape) or current.dtype != value.dtype:
                raise _fail(file_of(name), f"tensor {name!r}: stored {str(value.dtype).removeprefix('torch.')} "
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
    restore_experts_implementation(model, experts_implementation_of(info.config))
    _attach_quantizer(model, info.config)
    if built:
        model.eval()
    return model


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


def shard_metadata(config: dict | None, params: Mapping[str, dict], manifest: Mapping[str, list],
                   aliases: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    md = {
        META_FORMAT: "pt",
        META_VERSION: str(FORMAT_VERSION),
        META_CONFIG: _canonical_json(config),
        META_PARAMS: _canonical_json(dict(params)),
        META_MANIFEST: _canonical_json(dict(manifest)),
        META_ALIASES: _canonical_json(dict(aliases)),
    }
    md.update(extra or {})
    md[META_DIGEST] = metadata_digest(md)
    return md


def metadata_digest(metadata: Mapping[str, str]) -> str:
    """blake2b-128 of the ``milo_*`` metadata values (all but the digest itself), in key order."""
    fields = {k: v for k, v in metadata.items() if k.startswith("milo_") and k != META_DIGEST}
    return hashlib.blake2b(_canonical_json(fields).encode("utf-8"), digest_size=_DIGEST_SIZE).hexdigest()


def _units(tensors: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Groups of stored names kept in one shard: the inner tensors of a quantized parameter stay together."""
    groups: dict[str, list[str]] = {}
    for name in tensors:
        groups.setdefault(name.split(MILO_SEP, 1)[0], []).append(name)
    return list(groups.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def config_json_for(model: nn.Module, milo_config: dict | None) -> str | None:
    """config.json text for a quantized transformers model (quantization_config set to milo)."""
    model_config = getattr(model, "config", None)
    if model_config is None or not hasattr(model_config, "to_json_string"):
        return None
    import copy

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


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _current_files(directory: Path) -> set[str]:
    """Weight files of the checkpoint now in ``directory`` (what a save must not break before it commits)."""
    names: set[str] = set()
    if (directory / SAFE_WEIGHTS_NAME).is_file():
        names.add(SAFE_WEIGHTS_NAME)
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        names.add(SAFE_WEIGHTS_INDEX_NAME)
        with contextlib.suppress(Exception):
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            names |= {v for v in weight_map.values() if isinstance(v, str) and os.path.basename(v) == v}
    return names


def write_index(directory: Path, weight_map: Mapping[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": int(total_size), META_VERSION: FORMAT_VERSION},
             "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(directory / SAFE_WEIGHTS_INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")


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
    manifest = {n: _manifest_entry(t, tensor_digest(t)) for n, t in tensors.items()}
    checkpoint_id = hashlib.blake2b(_canonical_json(manifest).encode(), digest_size=4).hexdigest()

    shards: list[list[str]] = []
    size = 0
    for unit in _units(tensors):
        unit_size = sum(_nbytes(tensors[n]) for n in unit)
        if not shards or (size + unit_size > limit and size > 0):
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += unit_size
    if not shards:
        shards = [[]]
    if len(shards) == 1:
        names = [SAFE_WEIGHTS_NAME]
    else:
        names = [f"model-{checkpoint_id}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    before = _current_files(directory)
    metadata = shard_metadata(milo_config, params, manifest, aliases)
    temps: list[Path] = []
    renamed: list[Path] = []
    try:
        for name, shard in zip(names, shards):
            tmp = directory / f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
            temps.append(tmp)
            _write_safetensors(tmp, {n: tensors[n] for n in shard}, metadata)
        # Shards of a sharded save have fresh names (the checkpoint id), so renaming them touches
        # nothing the current checkpoint uses; the commit point is the last rename.
        for tmp, name in zip(temps, names):
            if name == SAFE_WEIGHTS_NAME:
                continue
            os.replace(tmp, directory / name)
            renamed.append(directory / name)
        if len(names) == 1:
            os.replace(temps[0], directory / SAFE_WEIGHTS_NAME)  # commit
        else:
            weight_map = {n: file for file, shard in zip(names, shards) for n in shard}
            write_index(directory, weight_map, sum(_nbytes(t) for t in tensors.values()))  # commit ...
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / SAFE_WEIGHTS_NAME)  # ... which takes effect once model.safetensors is gone
        _fsync_dir(directory)
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
    if write_config:
        text = config_json_for(model, milo_config)
        if text is not None:
            atomic_write_text(directory / CONFIG_NAME, text)
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "to_json_string") and getattr(model, "can_generate", lambda: False)():
            atomic_write_text(directory / "generation_config.json", generation.to_json_string(use_diff=True))
    return [directory / n for n in names]


def remove_stale_temps(directory: str | os.PathLike) -> None:
    """Delete temporary files a killed save left in ``directory``."""
    for path in Path(directory).glob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def iter_checkpoint_files(directory: str | os.PathLike) -> Iterable[Path]:
    files, _, _ = _checkpoint_files(Path(directory))
    return files
