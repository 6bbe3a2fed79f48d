"""Layer-by-layer quantization of a transformers model folder into a MiLo checkpoint (``milo quantize``).

The float model is never materialized whole: its skeleton is built on the meta device, then for
each decoder layer (and once for everything outside the layers: embeddings, final norm, head)

1. only that layer's tensors are read from the source safetensors (``safe_open``), through
   transformers' own key conversions (per-expert checkpoints are merged into the 3D expert
   parameters exactly as ``from_pretrained`` does) onto ``device``;
2. the layer is quantized with ``milo_tensor.quantize_`` and the given config, with the parameter
   names the whole model has (rank policies see the same names as an in-memory ``quantize_``);
3. its tensors are written as one shard of the output checkpoint (temporary file, then rename),
   with the per-weight statistics the summary needs in the shard's metadata;
4. the layer goes back to the meta device.

So peak memory stays near one layer (float + quantized). A shard is only ever complete or absent;
re-running after a kill verifies the shards already there (their checksums, the MiLo config, and a
digest of the names, shapes and bytes of the source tensors they were made from) and quantizes only
the layers without a valid shard. A shard of another format version (written before the int3 layout
changed) is not valid: its layer is quantized again, so a checkpoint never mixes layouts. Quantization
is deterministic, so a resumed run writes the same bytes as an uninterrupted one. The result is an
ordinary MiLo checkpoint: ``load_quantized(out)`` and ``from_pretrained(out)`` read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from milo_tensor.checkpoint import (
    CONFIG_NAME,
    DTYPES,
    FLOAT_DTYPES,
    META_CONFIG,
    META_DIGEST,
    META_MANIFEST,
    META_STATS,
    META_UNIT,
    META_VERSION,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    TMP_PREFIX,
    CheckpointError,
    atomic_write_text,
    canonical_json,
    current_files,
    digest_from_file,
    manifest_entry,
    read_header,
    shard_metadata,
    tensor_digest,
    write_index,
    write_safetensors,
)
from milo_tensor.quant.packing import FORMAT_VERSION
from milo_tensor.serialization import config_to_dict, flatten_state_dict
from milo_tensor.tensor import MiLoInt3Tensor

__all__ = ["quantize_checkpoint", "QuantizeSummary", "ABORT_ENV"]

# Testing hook: "N" stops (KeyboardInterrupt, as Ctrl-C) once N layers were written in this run;
# "N:kill" SIGKILLs the process there instead.
ABORT_ENV = "MILO_TEST_ABORT_AFTER_LAYERS"
REST = "<rest>"
LOCK_NAME = ".milo-quantize.lock"
_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


@dataclass
class WeightStat:
    """One quantized parameter in the summary (kept in its shard's metadata, so a resumed run can print it)."""

    fqn: str
    kind: str  # "dense" or "expert"
    count: int  # 2D weights it holds (experts of a stack)
    bytes_before: int
    bytes_after: int
    ranks: list[int]
    rel_errors: list[float]


@dataclass
class QuantizeSummary:
    """What ``milo quantize`` did: per-weight statistics and timings; ``table()`` is the printed summary."""

    out: Path
    stats: list[WeightStat]
    other_bytes: int  # float tensors kept as they are
    seconds: float
    layers_done: int  # written in this run
    layers_skipped: int  # already complete from an earlier run
    files: list[str] = field(default_factory=list)

    def rows(self) -> list[list[str]]:
        rows = []
        kinds = sorted({s.kind for s in self.stats})
        for kind in kinds + ["total"]:
            group = [s for s in self.stats if kind in ("total", s.kind)]
            if not group:
                continue
            ranks = [r for s in group for r in s.ranks]
            errors = [e for s in group for e in s.rel_errors]
            before = sum(s.bytes_before for s in group)
            after = sum(s.bytes_after for s in group)
            rows.append([
                kind, str(len(group)), str(sum(s.count for s in group)), _human(before), _human(after),
                f"{after / before:.1%}" if before else "-",
                f"{min(ranks)}/{sum(ranks) / len(ranks):.1f}/{max(ranks)}" if ranks else "-",
                f"{sum(errors) / len(errors):.4f}" if errors else "-",
            ])
        return rows

    def table(self) -> str:
        header = ["kind", "params", "weights", "bytes before", "bytes after", "ratio", "rank min/mean/max", "mean rel. error"]
        lines = [_table(self.rows(), header)]
        lines.append(f"float tensors kept as they are: {_human(self.other_bytes)}; layers quantized now: "
                     f"{self.layers_done}, resumed from an earlier run: {self.layers_skipped}; time {self.seconds:.1f} s")
        lines.append(f"checkpoint: {self.out}")
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


# ---------------------------------------------------------------------- the source folder


class _Source:
    """The float checkpoint: its files, keys, and the per-key slices read on demand."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = directory
        single, index = directory / SAFE_WEIGHTS_NAME, directory / SAFE_WEIGHTS_INDEX_NAME
        if single.is_file():
            files = {SAFE_WEIGHTS_NAME}
        elif index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = set(weight_map.values())
        else:
            raise FileNotFoundError(f"{directory}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} (only safetensors sources are read)")
        self._stack = contextlib.ExitStack()
        self.handles = {}
        self.key_file: dict[str, str] = {}
        self.key_info: dict[str, tuple[str, list[int]]] = {}
        for name in sorted(files):
            handle = self._stack.enter_context(safe_open(directory / name, framework="pt", device="cpu"))
            self.handles[name] = handle
            for key in handle.keys():
                self.key_file[key] = name
                sl = handle.get_slice(key)
                self.key_info[key] = (sl.get_dtype(), list(sl.get_shape()))

    def slices(self, keys) -> dict:
        return {k: self.handles[self.key_file[k]].get_slice(k) for k in keys}

    def digest(self, keys) -> str:
        """blake2b of the named tensors' names, dtypes, shapes and bytes, read one tensor at a time.

        A resumed run compares it with the digest a finished shard recorded, so a layer whose
        source weights changed since is quantized again rather than kept stale.
        """
        h = hashlib.blake2b(digest_size=16)
        for key in sorted(keys):
            h.update(canonical_json([key, *self.key_info[key]]).encode())
            h.update(tensor_digest(self.handles[self.key_file[key]].get_tensor(key)).encode())
        return h.hexdigest()

    def close(self) -> None:
        self._stack.close()

    def first_float_dtype(self) -> torch.dtype | None:
        for key in sorted(self.key_info):
            dtype = DTYPES.get(self.key_info[key][0])
            if dtype is not None and dtype.is_floating_point:
                return dtype
        return None


def _resolve_dtype(dtype, model_config, source: _Source) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
        return FLOAT_DTYPES[dtype]
    cfg_dtype = getattr(model_config, "dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = FLOAT_DTYPES.get(cfg_dtype)
    if isinstance(cfg_dtype, torch.dtype):
        return cfg_dtype
    return source.first_float_dtype() or torch.get_default_dtype()


def _layers_prefix(model: nn.Module) -> str | None:
    """The decoder layers' ModuleList (the one named ``*layers`` with the most parameters)."""
    best, best_size = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] in ("layers", "h", "blocks") and len(module):
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    return best


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if enabled:
            hf_logging.enable_progress_bar()


def _to_meta(module: nn.Module) -> None:
    """Drop a module's tensors (back to the meta device) once its shard is written."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and not p.is_meta:
                sub._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None and not b.is_meta:
                sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="meta")


def _kind(fqn: str, weight: torch.Tensor) -> str:
    return "expert" if weight.ndim == 3 or _EXPERT_INDEX.search(fqn) else "dense"


def _weight_stat(fqn: str, float_weight: torch.Tensor, q: MiLoInt3Tensor) -> WeightStat:
    ref = float_weight.detach().float()
    deq = q.dequantize(torch.float32)
    if ref.ndim == 2:
        ref, deq = ref.unsqueeze(0), deq.unsqueeze(0)
    err = ((deq - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-30)).tolist()
    return WeightStat(
        fqn=fqn, kind=_kind(fqn, float_weight), count=ref.shape[0],
        bytes_before=float_weight.numel() * float_weight.element_size(), bytes_after=q.storage_nbytes(),
        ranks=list(q.ranks), rel_errors=[round(e, 6) for e in err],
    )


def _seed_for(name: str) -> int:
    """A seed per unit (the randomized SVD draws from it): a layer quantized in a resumed run gets the
    same random numbers as in an uninterrupted one, whatever was quantized before it."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


# ---------------------------------------------------------------------- the streaming loop


def quantize_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    config=None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "auto",
    progress: bool = True,
    compensator_dtype: str | torch.dtype | None = None,
) -> QuantizeSummary:
    """Quantize the transformers model folder ``src`` into a MiLo checkpoint in ``out``, a layer at a time.

    ``config``: a ``MiLoInt3Config`` (default ``milo_int3()``). ``dtype``: the float dtype the model
    is built in ("auto": config.json's, like ``from_pretrained``). ``compensator_dtype``: the float
    dtype the caller wants a float compensator stored in; the format stores it in the weights'
    dtype, so any other dtype is refused up front rather than silently ignored. Resumable:
    completed layers already in ``out`` are verified and kept.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    from milo_tensor.config import make_filter, milo_int3
    from milo_tensor.integrations.hf_quantizer import MiLoHfConfig

    start = time.perf_counter()
    config = milo_int3() if config is None else config
    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise ValueError("the output folder must differ from the source folder")
    device = torch.device(device)
    if not (src / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{src}: not a transformers model folder (no {CONFIG_NAME})")
    model_config = AutoConfig.from_pretrained(src)
    if getattr(model_config, "quantization_config", None) is not None:
        raise ValueError(f"{src} holds an already quantized model ({model_config.quantization_config}); "
                         f"quantize its float original")
    source = _Source(src)
    lock = None
    try:
        dtype = _resolve_dtype(dtype, model_config, source)
        if compensator_dtype is not None and config.compensator_bits is None:
            wanted = _resolve_dtype(compensator_dtype, model_config, source)
            if wanted != dtype:
                raise ValueError(
                    f"a float compensator is stored in the weights' dtype ({str(dtype).removeprefix('torch.')}), "
                    f"not {str(wanted).removeprefix('torch.')}: pass --dtype {str(wanted).removeprefix('torch.')} to "
                    f"build the model in it, or store the compensator as 'model', int8 or int3"
                )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
        model.eval()
        milo_config = config_to_dict(config)

        # Source key -> model key, with transformers' conversions (per-expert -> 3D experts, renames).
        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        meta_state = model.state_dict()
        targets: dict[str, str] = {}
        for key in source.key_info:
            renamed, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
            if renamed not in meta_state and key in meta_state:
                renamed = key
            targets[key] = renamed

        # Units: one per decoder layer, then the rest (embeddings, final norm, head).
        prefix = _layers_prefix(model)
        n_layers = len(model.get_submodule(prefix)) if prefix else 0

        def unit_of(fqn: str) -> str:
            if prefix and fqn.startswith(prefix + "."):
                return f"{prefix}.{fqn[len(prefix) + 1:].split('.', 1)[0]}"
            return REST

        unit_names = [f"{prefix}.{i}" for i in range(n_layers)] + [REST]
        unit_keys: dict[str, list[str]] = {u: [] for u in unit_names}
        for key, target in targets.items():
            unit_keys.setdefault(unit_of(target), []).append(key)
        unit_names = [u for u in unit_names if unit_keys.get(u)]

        # Tied parameters: stored once, under the name the source holds.
        by_id: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(name)
        loaded_names = set(targets.values())
        aliases: dict[str, str] = {}
        for names in by_id.values():
            if len(names) > 1:
                canonical = next((n for n in names if n in loaded_names), names[0])
                aliases.update({n: canonical for n in names if n != canonical})

        src_config_hash = hashlib.blake2b(model_config.to_json_string(use_diff=True).encode(), digest_size=8).hexdigest()
        count = len(unit_names)
        file_names = {u: f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i, u in enumerate(unit_names)}
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock_output(out)
        previous = current_files(out)
        for stale in out.glob(f"{TMP_PREFIX}*"):
            stale.unlink(missing_ok=True)

        abort_spec = os.environ.get(ABORT_ENV, "").strip()
        abort_after = int(abort_spec.split(":")[0] or 0) if abort_spec else 0
        abort_kill = abort_spec.endswith(":kill")
        stats: list[WeightStat] = []
        other_bytes = 0
        weight_map: dict[str, str] = {}
        shard_digests: dict[str, str] = {}
        total_size = 0
        done = skipped = 0
        dtype_plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
        run = _Run(model, source, config, milo_config, aliases, device, dtype, dtype_plan, make_filter(config.skip),
                   prefix, progress, mapping)
        bar = tqdm(unit_names, desc="MiLo quantize", unit="layer", disable=not progress)
        for unit in bar:
            bar.set_postfix_str(unit if unit != REST else "embeddings / norm / head", refresh=True)
            keys = sorted(unit_keys[unit])
            fingerprint = {
                "unit": unit, "file": file_names[unit], "source_config": src_config_hash, "dtype": str(dtype),
                "source": [[k, *source.key_info[k]] for k in keys], "source_digest": source.digest(keys),
            }
            unit_meta = canonical_json(fingerprint)
            path = out / file_names[unit]
            existing = _existing_shard(path, unit_meta, canonical_json(milo_config))
            if existing is not None:
                header, unit_stats, unit_other = existing
                skipped += 1
            else:
                header, unit_stats, unit_other = _quantize_unit(run, unit, keys, unit_meta, path)
                done += 1
            stats.extend(unit_stats)
            other_bytes += unit_other
            shard_digests[path.name] = header.metadata[META_DIGEST]
            for name, entry in header.entries.items():
                weight_map[name] = path.name
                total_size += entry.end - entry.start
            if existing is None and abort_after and done >= abort_after and unit != unit_names[-1]:
                if abort_kill:
                    os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: no cleanup runs
                raise KeyboardInterrupt(f"{ABORT_ENV}={abort_after}: stopping after {done} layer(s)")
        bar.close()

        # Commit: the index (entry point of the checkpoint), then config.json and the folder's other files.
        write_index(out, weight_map, total_size, shard_digests)
        (out / SAFE_WEIGHTS_NAME).unlink(missing_ok=True)
        for name in previous - set(file_names.values()) - {SAFE_WEIGHTS_INDEX_NAME}:
            (out / name).unlink(missing_ok=True)
        cfg = model_config.__class__.from_dict(model_config.to_dict())
        cfg.quantization_config = MiLoHfConfig(milo_config=milo_config).to_dict()
        cfg.dtype = str(dtype).removeprefix("torch.")
        atomic_write_text(out / CONFIG_NAME, cfg.to_json_string(use_diff=True))
        _copy_side_files(src, out)
        (out / LOCK_NAME).unlink(missing_ok=True)
        return QuantizeSummary(out, stats, other_bytes, time.perf_counter() - start, done, skipped,
                               sorted(set(file_names.values())))
    finally:
        source.close()
        if lock is not None:
            lock.close()  # releases the flock (the OS also does, if the process is killed)


def _lock_output(out: Path):
    """An exclusive lock on ``out`` for this run: two runs into one folder would delete each other's
    temporary files and race on the shards. The lock is a ``flock``, so a killed run never leaves
    it held; the file is removed when a run completes. None where ``fcntl`` does not exist."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    handle = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ValueError(f"{out}: another `milo quantize` is writing to this folder") from None
    return handle


def _existing_shard(path: Path, unit_meta: str, config_json: str):
    """(header, stats, other_bytes) of a complete, verified shard for this unit, else None (a shard of
    an older format version too: the layer is quantized again, so the checkpoint is all one version)."""
    if not path.is_file():
        return None
    try:
        header = read_header(path)
        md = header.metadata
        if (md.get(META_VERSION) != str(FORMAT_VERSION) or md.get(META_UNIT) != unit_meta
                or md.get(META_CONFIG) != config_json):
            return None
        manifest = json.loads(md[META_MANIFEST])
        if set(manifest) != set(header.entries):
            return None
        with open(path, "rb") as fh:
            for name in header.entries:
                if digest_from_file(fh, header, name) != manifest[name][2]:
                    return None
        raw = json.loads(md[META_STATS])
        stats = [WeightStat(**s) for s in raw["weights"]]
        return header, stats, int(raw["other_bytes"])
    except (CheckpointError, OSError, KeyError, ValueError, TypeError):
        return None


@dataclass
class _Run:
    """What every unit of one ``quantize_checkpoint`` call shares."""

    model: nn.Module  # on the meta device, but for the unit being quantized
    source: _Source
    config: object  # MiLoInt3Config
    milo_config: dict
    aliases: dict[str, str]  # tied name -> stored name
    device: torch.device
    dtype: torch.dtype
    dtype_plan: dict
    base_filter: Callable
    prefix: str | None  # the decoder layers' ModuleList
    progress: bool
    mapping: list  # transformers' weight conversions (source keys -> model parameters)


def _quantize_unit(run: _Run, unit: str, keys: list[str], unit_meta: str, path: Path):
    """Load one unit's source tensors, quantize them, write its shard (temp + rename), drop them again."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    from milo_tensor.config import quantize_

    model, source, config, aliases, device, prefix = run.model, run.source, run.config, run.aliases, run.device, run.prefix
    in_unit = (lambda fqn: fqn == unit or fqn.startswith(unit + ".")) if unit != REST else (
        lambda fqn: not (prefix and (fqn == prefix or fqn.startswith(prefix + "."))))

    load_config = LoadStateDictConfig(
        pretrained_model_name_or_path=str(source.directory), device_map={"": device}, dtype=run.dtype,
        dtype_plan=run.dtype_plan, weight_mapping=run.mapping,
    )
    with _quiet_transformers():
        info, _ = convert_and_load_state_dict_in_model(model=model, state_dict=source.slices(keys), load_config=load_config)
    if info.conversion_errors:
        raise RuntimeError(f"{source.directory}: converting {unit}'s tensors failed: {info.conversion_errors}")
    if info.mismatched_keys:
        raise RuntimeError(f"{source.directory}: tensors of {unit} have the wrong shape: {sorted(info.mismatched_keys)[:5]}")
    state = model.state_dict(keep_vars=True)
    for alias, canonical in aliases.items():
        if in_unit(alias) and not state[canonical].is_meta:
            module_name, _, leaf = alias.rpartition(".")
            model.get_submodule(module_name)._parameters[leaf] = state[canonical]
    unit_state = {n: t for n, t in model.state_dict(keep_vars=True).items() if in_unit(n)}
    missing = sorted(n for n, t in unit_state.items() if t.is_meta and n not in aliases)
    if missing:
        raise RuntimeError(f"{source.directory}: the source has no tensor for {missing[:5]} (of {unit})")

    floats = {n: t for n, t in unit_state.items() if isinstance(t, nn.Parameter) and t.ndim in (2, 3)}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(_seed_for(unit))
        quantize_(model, config, filter_fn=lambda m, fqn="": in_unit(fqn) and run.base_filter(m, fqn), progress=run.progress)

    unit_state = {n: t for n, t in model.state_dict(keep_vars=True).items() if in_unit(n) and n not in aliases}
    stats, other = [], 0
    for name, t in unit_state.items():
        if isinstance(t, MiLoInt3Tensor):
            stats.append(_weight_stat(name, floats[name], t))
        else:
            other += t.numel() * t.element_size()
    tensors, params, _ = flatten_state_dict(unit_state)
    tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    manifest = {n: manifest_entry(t, tensor_digest(t)) for n, t in tensors.items()}
    extra = {META_UNIT: unit_meta,
             META_STATS: canonical_json({"weights": [dataclasses.asdict(s) for s in stats], "other_bytes": other})}
    metadata = shard_metadata(run.milo_config, params, manifest, aliases, extra)
    tmp = path.parent / f"{TMP_PREFIX}{os.getpid()}-{path.name}"
    try:
        write_safetensors(tmp, tensors, metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    del floats, tensors, unit_state
    _to_meta(model)
    return read_header(path), stats, other


def _copy_side_files(src: Path, out: Path) -> None:
    """Tokenizer and other small files of the source folder (not weights, not config.json)."""
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name in (CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME) or path.name.startswith("."):
            continue
        if path.name.endswith(_WEIGHT_FILE_SUFFIXES) or path.name.endswith(".index.json"):
            continue
        target = out / path.name
        if target.is_file() and target.read_bytes() == path.read_bytes():
            continue
        tmp = out / f"{TMP_PREFIX}{os.getpid()}-{path.name}"
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
