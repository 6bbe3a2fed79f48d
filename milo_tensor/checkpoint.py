"""The MiLo checkpoint format on disk: safetensors files, their header metadata, the index, validation.

This module knows files, not models (milo_tensor.serialization puts models in and takes them out;
streaming.py writes the same files a layer at a time). A checkpoint directory holds either
``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Every file is an
ordinary safetensors file whose header ``__metadata__`` (str -> str) carries:

    format                 "pt" (what transformers expects)
    milo_format_version    "2" (quant/packing.FORMAT_VERSION); "1" is read (its int3 words are repacked,
                           :func:`to_current_layout`), any other version is refused
    milo_config            the MiLoInt3Config as JSON (null if unknown)
    milo_params            {fqn: {shape, dtype, group_size, ranks, comp_bits, comp_group_size}} of the
                           quantized parameters in this file
    milo_manifest          {stored name: [dtype, shape, blake2b-128 of the bytes]} of this file's tensors
    milo_aliases           {tied name: stored name}
    milo_unit / milo_stats (``milo quantize`` only) the layer a shard holds and its error statistics
    milo_metadata_digest   blake2b-128 over all the milo_* values above

A ``MiLoInt3Tensor`` parameter ``P`` is stored as its plain inner tensors ``P.__milo__.qdata``,
``P.__milo__.scales``, ... (``__tensor_flatten__``; empty ones, i.e. rank 0, are not stored).

Files are written here rather than by the ``safetensors`` package so that the bytes are
deterministic (the package orders the metadata by hash): ``milo quantize`` relies on that for
byte-identical resumes. Reading never unpickles and never trusts a length, an offset or a JSON
value: :func:`read_checkpoint` validates everything (header structure, offsets, manifest,
expected shapes and dtypes from the attributes, checksums, missing / extra / duplicated tensors,
consistency across shards) and raises :class:`CheckpointError`, naming the file and the tensor.
"""

from __future__ import annotations

import contextlib
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

from milo_tensor.quant.packing import FORMAT_VERSION, repack_v1
from milo_tensor.tensor import MiLoInt3Tensor

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "read_checkpoint",
    "verify_checkpoint",
    "build_quantized",
    "check_format_version",
    "to_current_layout",
    "SUPPORTED_FORMAT_VERSIONS",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MILO_SEP = ".__milo__."
SUPPORTED_FORMAT_VERSIONS = (1, 2)  # 1: the format-1 int3 layout, repacked at load (to_current_layout)
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
META_SHARDS = "milo_shards"  # in the index's metadata: shard file -> its META_DIGEST

_HEADER_LIMIT = 100 * 1024 * 1024
_DIGEST_SIZE = 16
_ALIGN = 64
_READ_CHUNK = 64 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_INNER_REQUIRED = ("qdata", "scales", "zeros", "ut", "v")
_INNER_COMP_QPARAMS = ("ut_scales", "ut_zeros", "v_scales", "v_zeros")
INNER_NAMES = _INNER_REQUIRED + _INNER_COMP_QPARAMS


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: corrupt, truncated, of an unknown version, or not matching the model."""




def fail(where: str | os.PathLike, message: str) -> CheckpointError:
    """A CheckpointError whose message starts with the file (or directory) at fault."""
    return CheckpointError(f"{os.fspath(where)}: {message}")


# ---------------------------------------------------------------------- attributes of a quantized parameter



def expected_inner(fqn: str, meta: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The stored (shape, dtype) of every inner tensor of a quantized parameter, from its attributes.

    Raises CheckpointError-free ValueError on inconsistent attributes (callers add the file name).
    """
    shape = meta["shape"]
    dtype = FLOAT_DTYPES[meta["dtype"]]
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
    if meta["dtype"] not in FLOAT_DTYPES:
        raise ValueError(f"{fqn}: unsupported dtype {meta['dtype']!r}")
    if not is_int(meta["group_size"]):
        raise ValueError(f"{fqn}: malformed group size {meta['group_size']!r}")
    if not isinstance(meta["ranks"], list) or not all(is_int(r) for r in meta["ranks"]):
        raise ValueError(f"{fqn}: malformed ranks {meta['ranks']!r}")
    for key in ("comp_bits", "comp_group_size"):
        if meta[key] is not None and not is_int(meta[key]):
            raise ValueError(f"{fqn}: malformed {key} {meta[key]!r}")
    expected_inner(fqn, meta)
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


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys: the same value always gives the same bytes (and digests)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def manifest_entry(t: torch.Tensor, digest: str) -> list:
    """``[dtype, shape, digest]``: what the manifest records so a reader can check each tensor's bytes."""
    return [DTYPE_NAMES[t.dtype], [int(s) for s in t.shape], digest]


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> int:
    """Write a safetensors file with a deterministic header; fsync it. Returns its size in bytes."""
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
    # The data starts on a 64-byte boundary; tensors whose size is a multiple of 64 bytes come first
    # (each stays 64-byte aligned when the file is memory-mapped, so SIMD kernels take the same path
    # as on freshly allocated tensors), then the rest by decreasing element size (each stays aligned
    # to its element size, as safetensors does).
    order = sorted(tensors, key=lambda n: (tensor_nbytes(tensors[n]) % _ALIGN != 0, -tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": [int(s) for s in t.shape], "data_offsets": [offset, offset + nbytes]}
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
class Entry:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class Header:
    path: Path
    metadata: dict[str, str]
    entries: dict[str, Entry]
    data_start: int


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header (never trusting a length or an offset)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise fail(path, f"truncated: {size} bytes, not even a header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > _HEADER_LIMIT or 8 + n > size:
                raise fail(path, f"bad header length {n} for a file of {size} bytes (truncated or corrupt)")
            raw = fh.read(n)
    except OSError as err:
        raise fail(path, f"cannot read: {err}") from err
    if len(raw) != n:
        raise fail(path, "truncated header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise fail(path, f"corrupt header (not JSON): {err}") from None
    if not isinstance(header, dict):
        raise fail(path, "corrupt header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise fail(path, "corrupt header: __metadata__ is not a str -> str map")
    entries: dict[str, Entry] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise fail(path, f"tensor {name!r}: malformed header entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise fail(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise fail(path, f"tensor {name!r}: malformed shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise fail(path, f"tensor {name!r}: malformed data_offsets {offsets!r}")
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
        if offsets[1] - offsets[0] != numel * itemsize:
            raise fail(path, f"tensor {name!r}: data_offsets {offsets} do not hold a {dtype} tensor of shape {shape}")
        entries[name] = Entry(dtype, tuple(shape), offsets[0], offsets[1])
    data_len = size - 8 - n
    position = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start != position:
            raise fail(path, f"tensor {name!r}: data_offsets {[e.start, e.end]} leave a gap or overlap at byte {position}")
        position = e.end
    if position != data_len:
        what = "truncated" if position > data_len else "has trailing bytes"
        raise fail(path, f"{what}: the header describes {position} data bytes, the file holds {data_len}")
    return Header(path, metadata, entries, 8 + n)


def read_tensor(fh, header: Header, name: str) -> torch.Tensor:
    """Read one tensor into fresh (owned, aligned) CPU memory: no mmap, so a later change to the
    file cannot alter a loaded model, and the bytes read are the bytes checksummed."""
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
                raise fail(header.path, f"tensor {name!r}: truncated data")
            got += count
    return buf.view(DTYPES[e.dtype]).reshape(e.shape)


def digest_from_file(fh, header: Header, name: str) -> str:
    """The digest of one stored tensor, streamed in chunks (verification without holding the data)."""
    e = header.entries[name]
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    fh.seek(header.data_start + e.start)
    left = e.end - e.start
    while left:
        chunk = fh.read(min(left, _READ_CHUNK))
        if not chunk:
            raise fail(header.path, f"tensor {name!r}: truncated data")
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
    headers: dict[Path, Header] = field(repr=False, default_factory=dict)
    tensors: dict[str, torch.Tensor] | None = field(repr=False, default=None)

    @property
    def float_names(self) -> list[str]:
        return [n for n in self.manifest if MILO_SEP not in n]


def checkpoint_files(directory: Path) -> tuple[list[Path], dict[str, str] | None, dict[str, Any]]:
    """The weight files of a directory: model.safetensors wins over an index (as in transformers)."""
    single = directory / SAFE_WEIGHTS_NAME
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if single.is_file():
        return [single], None, {}
    if not index.is_file():
        if not directory.is_dir():
            raise fail(directory, "no such checkpoint directory")
        raise fail(directory, f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise fail(index, f"corrupt index: {err}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise fail(index, "corrupt index: no weight_map of tensor name -> file name")
    meta = data.get("metadata") or {}
    if not isinstance(meta, dict):
        raise fail(index, "corrupt index: metadata is not an object")
    names = sorted(set(weight_map.values()))
    for name in names:
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise fail(index, f"weight_map names a file outside the checkpoint: {name!r}")
        if not (directory / name).is_file():
            raise fail(directory / name, "missing shard (listed in the index)")
    return [directory / n for n in names], weight_map, meta


def _load_json_meta(path: Path, metadata: Mapping[str, str], key: str, kind: type, required: bool = True):
    if key not in metadata:
        if required:
            raise fail(path, f"header metadata lacks {key!r}: not a MiLo checkpoint, or a corrupt one")
        return None
    try:
        value = json.loads(metadata[key])
    except (json.JSONDecodeError, RecursionError) as err:
        raise fail(path, f"corrupt header metadata {key!r}: {err}") from None
    if not isinstance(value, kind):
        raise fail(path, f"corrupt header metadata {key!r}: expected a JSON {kind.__name__}")
    return value


def check_format_version(where: str | os.PathLike, version: Any) -> int:
    """``version`` if this milo_tensor reads it; else the CheckpointError every loader raises."""
    if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:
        raise fail(where, f"unknown MiLo format version {version!r} (this milo_tensor reads "
                          f"{list(SUPPORTED_FORMAT_VERSIONS)}); upgrade milo_tensor")
    return version


def _parse_version(path: Path, metadata: Mapping[str, str]) -> int:
    raw = metadata.get(META_VERSION)
    if raw is None:
        raise fail(path, f"header metadata lacks {META_VERSION!r}: not a MiLo checkpoint")
    if not re.fullmatch(r"[0-9]{1,9}", raw):
        raise fail(path, f"unknown MiLo format version {raw!r}")
    return check_format_version(path, int(raw))


def read_checkpoint(directory: str | os.PathLike, *, load: bool = True, verify_data: bool = True) -> CheckpointInfo:
    """Validate a checkpoint directory completely; with ``load``, return its tensors (on CPU) too."""
    directory = Path(directory)
    files, weight_map, index_meta = checkpoint_files(directory)
    headers = {p: read_header(p) for p in files}
    shard_digests = index_meta.get(META_SHARDS)
    if shard_digests is not None:  # indexes written by transformers' save_pretrained have none
        index = directory / SAFE_WEIGHTS_INDEX_NAME
        if not isinstance(shard_digests, dict) or set(shard_digests) != {p.name for p in files}:
            raise fail(index, f"corrupt index: {META_SHARDS} does not list exactly the files of the weight_map")
        for path, header in headers.items():
            if header.metadata.get(META_DIGEST) != shard_digests[path.name]:
                raise fail(path, "does not belong to this checkpoint: its metadata digest differs from the one "
                                 f"{SAFE_WEIGHTS_INDEX_NAME} records (a shard of another save?)")

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
            raise fail(path, "corrupt header metadata (its digest does not match)")
        if version is not None and v != version:
            raise fail(path, f"format version {v} differs from {version} of the other shards")
        version = v
        cfg = _load_json_meta(path, md, META_CONFIG, (dict, type(None)))
        if config_seen and cfg != config:
            raise fail(path, "its MiLo config differs from the other shards' (shards of different checkpoints?)")
        config, config_seen = cfg, True
        file_params = _load_json_meta(path, md, META_PARAMS, dict)
        for fqn, meta in file_params.items():
            try:
                meta = _check_param_meta(fqn, meta)
            except (ValueError, KeyError, TypeError) as err:
                raise fail(path, f"tensor {fqn!r}: {err}") from None
            if fqn in params and params[fqn] != meta:
                raise fail(path, f"tensor {fqn!r}: attributes differ from another shard's")
            params[fqn] = meta
        file_manifest = _load_json_meta(path, md, META_MANIFEST, dict)
        for name, entry in file_manifest.items():
            if (not isinstance(entry, list) or len(entry) != 3 or entry[0] not in DTYPES
                    or not isinstance(entry[1], list) or not isinstance(entry[2], str)):
                raise fail(path, f"tensor {name!r}: malformed manifest entry {entry!r}")
            if name in manifest and manifest[name] != entry:
                raise fail(path, f"tensor {name!r}: manifest entry differs from another shard's (mixed checkpoints?)")
            manifest[name] = entry
        file_aliases = _load_json_meta(path, md, META_ALIASES, dict, required=False) or {}
        if aliases is not None and file_aliases != aliases:
            raise fail(path, "its tied-weight aliases differ from the other shards'")
        aliases = file_aliases
    for path, header in headers.items():
        for name, e in header.entries.items():
            if name in location:
                raise fail(path, f"tensor {name!r} is stored twice (also in {location[name].name})")
            location[name] = path
            if weight_map is not None and weight_map.get(name) != path.name:
                raise fail(path, f"tensor {name!r} is not listed for this file in {SAFE_WEIGHTS_INDEX_NAME}")
            if name not in manifest:
                raise fail(path, f"extra tensor {name!r}: not in the checkpoint's manifest")
            expected = manifest[name]
            if [e.dtype, list(e.shape)] != [expected[0], expected[1]]:
                raise fail(path, f"tensor {name!r}: header says {e.dtype} {list(e.shape)}, the manifest "
                                  f"{expected[0]} {expected[1]} (corrupt header)")
    assert version is not None
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in location:
                raise fail(directory / fname, f"missing tensor {name!r} (listed in the index)")
    for name in manifest:
        if name not in location:
            raise fail(files[0] if len(files) == 1 else directory, f"missing tensor {name!r} (in the manifest, in no file)")

    # Quantized parameters: exactly their expected inner tensors, each of the expected shape / dtype.
    grouped: dict[str, set[str]] = {}
    for name in location:
        if MILO_SEP in name:
            fqn, inner = name.split(MILO_SEP, 1)
            if fqn not in params:
                raise fail(location[name], f"extra tensor {name!r}: {fqn!r} is not a quantized parameter of this checkpoint")
            grouped.setdefault(fqn, set()).add(inner)
    for fqn, meta in params.items():
        spec = expected_inner(fqn, meta)
        have = grouped.get(fqn, set())
        where = location.get(f"{fqn}{MILO_SEP}qdata", files[0])
        for inner in sorted(set(spec) - have):
            if _numel(spec[inner][0]) == 0:
                continue  # empty inner tensors need not be stored
            raise fail(where, f"missing tensor {fqn}{MILO_SEP}{inner}")
        for inner in sorted(have - set(spec)):
            raise fail(location[f"{fqn}{MILO_SEP}{inner}"], f"extra tensor {fqn}{MILO_SEP}{inner}")
        for inner, (shape, dtype) in spec.items():
            name = f"{fqn}{MILO_SEP}{inner}"
            if name not in location:
                continue
            e = headers[location[name]].entries[name]
            if e.shape != shape or DTYPES[e.dtype] != dtype:
                raise fail(location[name], f"tensor {name!r}: stored {e.dtype} {list(e.shape)}, expected "
                                            f"{DTYPE_NAMES[dtype]} {list(shape)} for {fqn}'s attributes")
        if fqn in location:
            raise fail(location[fqn], f"tensor {fqn!r} is stored both quantized and in float")
    for alias, target in (aliases or {}).items():
        if not isinstance(target, str) or alias in location or alias in params:
            raise fail(directory, f"tied name {alias!r} is stored as well (corrupt aliases)")
        if target not in location and target not in params:
            raise fail(directory, f"tied name {alias!r} points at {target!r}, which is not stored")

    info = CheckpointInfo(directory, files, version, config, params, manifest, aliases or {}, location, headers)
    if load or verify_data:
        tensors: dict[str, torch.Tensor] = {}
        for path, header in headers.items():
            try:
                with open(path, "rb") as fh:
                    for name in header.entries:
                        if load:
                            t = read_tensor(fh, header, name)
                            digest = tensor_digest(t)
                            tensors[name] = t
                        else:
                            digest = digest_from_file(fh, header, name)
                        if digest != manifest[name][2]:
                            raise fail(path, f"tensor {name!r}: checksum mismatch (corrupt data)")
            except OSError as err:
                raise fail(path, f"cannot read: {err}") from err
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


def to_current_layout(version: int, comp_bits: int | None, inner: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A quantized parameter's inner tensors as a checkpoint of format ``version`` stores them -> as
    this milo_tensor holds them (format FORMAT_VERSION). Every loader passes them through here.

    Formats 1 and 2 differ only in where the bits of each 32-code chunk sit in its 3 int32 words, so
    the int3-packed tensors -- ``qdata``, and ``ut`` / ``v`` of an int3 compensator (``comp_bits``
    3) -- go through ``repack_v1``; the others, shapes and dtypes are the same. Checksums are
    checked on the stored bytes, before this.
    """
    if version == FORMAT_VERSION:
        return dict(inner)
    if version != 1:
        raise ValueError(f"no conversion from MiLo format version {version!r}")
    packed = ("qdata", "ut", "v") if comp_bits == 3 else ("qdata",)
    return {name: repack_v1(t) if name in packed else t for name, t in inner.items()}


def build_quantized(fqn: str, meta: Mapping[str, Any], inner: Mapping[str, torch.Tensor],
                    device: torch.types.Device = None, *, version: int) -> MiLoInt3Tensor:
    """The MiLoInt3Tensor of a quantized parameter from its inner tensors as stored by a checkpoint of
    format ``version`` (repacked to the current layout, :func:`to_current_layout`) and its attributes."""
    fields = {}
    for name, (shape, dtype) in expected_inner(fqn, meta).items():
        t = inner.get(name)
        if t is None:
            if _numel(shape):
                raise KeyError(f"{fqn}: inner tensor {name!r} missing")
            t = torch.empty(shape, dtype=dtype)
        fields[name] = t if device is None else t.to(device)
    return MiLoInt3Tensor(
        **to_current_layout(version, meta["comp_bits"], fields),
        shape=tuple(meta["shape"]),
        group_size=meta["group_size"],
        ranks=tuple(meta["ranks"]),
        comp_bits=meta["comp_bits"],
        comp_group_size=meta["comp_group_size"],
    )


# ---------------------------------------------------------------------- writing


def shard_metadata(config: dict | None, params: Mapping[str, dict], manifest: Mapping[str, list],
                   aliases: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The header ``__metadata__`` of one file (see the module docstring), its digest included."""
    md = {
        META_FORMAT: "pt",
        META_VERSION: str(FORMAT_VERSION),
        META_CONFIG: canonical_json(config),
        META_PARAMS: canonical_json(dict(params)),
        META_MANIFEST: canonical_json(dict(manifest)),
        META_ALIASES: canonical_json(dict(aliases)),
    }
    md.update(extra or {})
    md[META_DIGEST] = metadata_digest(md)
    return md


def metadata_digest(metadata: Mapping[str, str]) -> str:
    """blake2b-128 of the ``milo_*`` metadata values (all but the digest itself), in key order."""
    fields = {k: v for k, v in metadata.items() if k.startswith("milo_") and k != META_DIGEST}
    return hashlib.blake2b(canonical_json(fields).encode("utf-8"), digest_size=_DIGEST_SIZE).hexdigest()


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies in a file."""
    return t.numel() * t.element_size()


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (temporary file, fsync, rename): readers see the old or the new file, never half."""
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
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Persist renames in ``directory`` (best effort: not every platform can fsync a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def current_files(directory: Path) -> set[str]:
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


def write_index(directory: Path, weight_map: Mapping[str, str], total_size: int, shard_digests: Mapping[str, str]) -> None:
    """Write (atomically) the index of a sharded checkpoint: transformers' layout plus, under
    ``metadata.milo_shards``, each shard's metadata digest -- which covers its manifest, i.e. the
    checksum of every tensor in it -- so a shard of another save swapped in is refused."""
    index = {"metadata": {"total_size": int(total_size), META_VERSION: FORMAT_VERSION,
                          META_SHARDS: dict(sorted(shard_digests.items()))},
             "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(directory / SAFE_WEIGHTS_INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
