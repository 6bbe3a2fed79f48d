"""Corrupt, truncated and edited checkpoints: CheckpointError every time, and the target model untouched.

Several hundred mutations of a small MiLo checkpoint: random byte flips in the header and in the
data, truncations, trailing bytes, header JSON edits (shapes, dtypes, offsets, names), tensors
removed or added, unknown format versions, edited metadata (attributes, manifest, checksums),
broken indexes and mixed shards. A load must raise CheckpointError (never another exception) and
leave the model it was loading into exactly as it was; the only other outcome allowed is a load
that is bit-identical to the original (a mutation that changes no content, e.g. a whitespace
byte of the header padding turned into another whitespace byte).
"""

import json
import os
import random
import shutil
import struct
import tempfile

import pytest
import torch

import milo_tensor.checkpoint as ckpt
from milo_tensor import CheckpointError, DenseSparseRank, MiLoInt3Tensor, load_quantized, milo_int3, quantize_, save_quantized
from models import tiny_moe

N_RANDOM_HEADER_FLIPS = 110
N_RANDOM_DATA_FLIPS = 110
N_TRUNCATIONS = 60
MODEL = dict(num_hidden_layers=1)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    model = tiny_moe("mixtral", **MODEL)
    # int3 compensator: int32 codes and float qparams among the inner tensors
    quantize_(model, milo_int3(DenseSparseRank(8, 4), iters=0, quantizer="rtn", compensator_bits=3,
                               compensator_group_size=32), progress=False)
    directory = tmp_path_factory.mktemp("original")
    save_quantized(model, directory)
    sharded = tmp_path_factory.mktemp("sharded")
    save_quantized(model, sharded, max_shard_size="40KB")
    return model, directory, sharded


class Target:
    """The model a corrupt checkpoint is loaded into; checks it is left exactly as it was."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.model = tiny_moe("mixtral", seed=3, **MODEL)
        self.model.config._experts_implementation = "eager"
        self.tensors = self._tensors()

    def _tensors(self):
        out = {}
        for module_name, module in self.model.named_modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(module, kind).items():
                    out[f"{module_name}.{name}"] = (t, t._version if t is not None else None)
        return out

    def assert_untouched(self, what):
        now = self._tensors()
        assert now.keys() == self.tensors.keys(), what
        for key, (t, version) in self.tensors.items():
            assert now[key][0] is t and (t is None or t._version == version), f"{what}: {key} changed"
        assert self.model.config._experts_implementation == "eager", what


@pytest.fixture(scope="module")
def target():
    return Target()


def same_as(original_model, loaded):
    sa, sb = original_model.state_dict(), loaded.state_dict()
    if sa.keys() != sb.keys():
        return False
    for name, a in sa.items():
        b = sb[name]
        if isinstance(a, MiLoInt3Tensor) != isinstance(b, MiLoInt3Tensor):
            return False
        if isinstance(a, MiLoInt3Tensor):
            na, aa = a.__tensor_flatten__()
            nb, ab = b.__tensor_flatten__()
            if na != nb or aa != ab or not all(torch.equal(getattr(a, n), getattr(b, n)) for n in na):
                return False
        elif a.dtype != b.dtype or not torch.equal(a, b):
            return False
    return True


def attempt(original_model, directory, target, what, *, must_fail=True, names_tensor=False):
    """Load ``directory`` into the target: CheckpointError (model untouched) or an exact load."""
    try:
        loaded = load_quantized(directory, model=target.model)
    except CheckpointError as err:
        target.assert_untouched(what)
        # the message starts with the file at fault (or the checkpoint directory itself)
        assert str(err).startswith(str(directory)), (what, str(err))
        if names_tensor:
            assert "tensor 'model." in str(err) or "tensor 'lm_head." in str(err), (what, str(err))
        return "error"
    except Exception as err:  # noqa: BLE001
        pytest.fail(f"{what}: raised {type(err).__name__} instead of CheckpointError: {err}")
    assert not must_fail, f"{what}: loaded without an error"
    assert same_as(original_model, loaded), f"{what}: silently loaded different content"
    target.reset()
    return "exact"


# ---------------------------------------------------------------------- helpers on raw files


def split_file(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:], n


def join_file(header: dict, data: bytes, pad_to: int = 8) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % pad_to)
    return struct.pack("<Q", len(text)) + text + data


def rebuild(raw: bytes, edit_tensors=None, edit_metadata=None, redigest=True) -> bytes:
    """Decode a file, edit its tensors / metadata, re-encode it as a well-formed safetensors file."""
    header, data, _ = split_file(raw)
    metadata = header.pop("__metadata__")
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        buf = torch.frombuffer(bytearray(data[start:end]), dtype=torch.uint8) if end > start else torch.empty(0, dtype=torch.uint8)
        tensors[name] = buf.view(ckpt.DTYPES[info["dtype"]]).reshape(info["shape"])
    if edit_tensors:
        edit_tensors(tensors, metadata)
    if edit_metadata:
        edit_metadata(metadata)
    if redigest:
        metadata[ckpt.META_DIGEST] = ckpt.metadata_digest(metadata)
    with tempfile.TemporaryDirectory() as scratch:  # per call: parallel test runs never share a file
        path = os.path.join(scratch, "rebuilt.safetensors")
        ckpt.write_safetensors(path, tensors, metadata)
        with open(path, "rb") as fh:
            return fh.read()


def flip_first_bit(t):
    t = t.clone()
    t.view(torch.uint8).reshape(-1)[0] ^= 1
    return t


def write(directory, raw):
    (directory / "model.safetensors").write_bytes(raw)


def json_edit(key, fn):
    def edit(metadata):
        value = json.loads(metadata[key])
        fn(value)
        metadata[key] = json.dumps(value)
    return edit


# ---------------------------------------------------------------------- the mutations


def test_random_byte_flips_and_truncations(original, target, tmp_path):
    model, directory, _ = original
    raw = (directory / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header_end = 8 + n
    work = tmp_path / "ckpt"
    shutil.copytree(directory, work)
    rng = random.Random(1234)
    outcomes = {"error": 0, "exact": 0}
    cases = []
    for _ in range(N_RANDOM_HEADER_FLIPS):
        cases.append(("header flip", [(rng.randrange(header_end), rng.randrange(1, 256)) for _ in range(rng.choice((1, 1, 2, 3)))]))
    for _ in range(N_RANDOM_DATA_FLIPS):
        cases.append(("data flip", [(rng.randrange(header_end, len(raw)), rng.randrange(1, 256)) for _ in range(rng.choice((1, 1, 2)))]))
    for what, flips in cases:
        mutated = bytearray(raw)
        for pos, xor in flips:
            mutated[pos] ^= xor
        write(work, bytes(mutated))
        outcomes[attempt(model, work, target, f"{what} {flips}", must_fail=False, names_tensor=what == "data flip")] += 1
    for _ in range(N_TRUNCATIONS):
        cut = rng.randrange(len(raw))
        write(work, raw[:cut])
        outcomes[attempt(model, work, target, f"truncated at {cut}/{len(raw)}")] += 1
    for extra in (b"\0", b" ", b"x" * 8, raw[-64:]):
        write(work, raw + extra)
        outcomes[attempt(model, work, target, f"{len(extra)} trailing bytes")] += 1
    # Everything corrupts content, except (rarely) whitespace-for-whitespace in the header padding.
    assert outcomes["exact"] <= 3, outcomes
    assert sum(outcomes.values()) >= 280


def test_header_edits(original, target, tmp_path):
    model, directory, _ = original
    raw = (directory / "model.safetensors").read_bytes()
    header, data, _ = split_file(raw)
    names = sorted(k for k in header if k != "__metadata__")
    inner = [n for n in names if ".__milo__." in n]
    floats = [n for n in names if ".__milo__." not in n]
    rng = random.Random(99)
    picks = rng.sample(inner, 8) + rng.sample(floats, 4)
    work = tmp_path / "ckpt"
    shutil.copytree(directory, work)
    edits = []

    def edit_entry(name, fn, what):
        def mutate():
            h, d, _ = split_file(raw)
            fn(h[name])
            return join_file(h, d)
        edits.append((f"{what} of {name}", mutate))

    for name in picks:
        shape = header[name]["shape"]
        edit_entry(name, lambda e: e.__setitem__("shape", e["shape"][::-1] if len(set(e["shape"])) > 1 else e["shape"] + [1]), "reversed shape")
        edit_entry(name, lambda e: e.__setitem__("shape", [e["shape"][0] * 2] + e["shape"][1:]), "doubled shape")
        edit_entry(name, lambda e: e.__setitem__("shape", []), "scalar shape")
        same_size = {"F32": "I32", "I32": "F32", "U8": "I8", "BF16": "F16", "F16": "BF16"}[header[name]["dtype"]]
        edit_entry(name, lambda e, d=same_size: e.__setitem__("dtype", d), "same-size dtype")
        edit_entry(name, lambda e: e.__setitem__("dtype", "F64"), "wider dtype")
        edit_entry(name, lambda e: e.__setitem__("dtype", "Q4"), "unknown dtype")
        edit_entry(name, lambda e: e.__setitem__("data_offsets", [e["data_offsets"][0] + 4, e["data_offsets"][1] + 4]), "shifted offsets")
        edit_entry(name, lambda e: e.__setitem__("data_offsets", [e["data_offsets"][0]]), "one offset")
        edit_entry(name, lambda e: e.__setitem__("data_offsets", [-1, e["data_offsets"][1]]), "negative offset")
        edit_entry(name, lambda e: e.pop("dtype"), "no dtype")
        del shape
    # Swapping the offsets of two same-size tensors is structurally valid: only checksums catch it.
    by_size = {}
    for name in names:
        start, end = header[name]["data_offsets"]
        by_size.setdefault((end - start, header[name]["dtype"], tuple(header[name]["shape"])), []).append(name)
    def content(name):
        start, end = header[name]["data_offsets"]
        return data[start:end]

    swaps = [group[:2] for group in by_size.values() if len(group) >= 2 and content(group[0]) != content(group[1])]
    assert swaps
    for a, b in swaps[:10]:
        def mutate(a=a, b=b):
            h, d, _ = split_file(raw)
            h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
            return join_file(h, d)
        edits.append((f"swapped data of {a} and {b}", mutate))
    # Renamed tensors.
    for name in picks[:6]:
        def mutate(name=name):
            h, d, _ = split_file(raw)
            h[name + "x"] = h.pop(name)
            return join_file(h, d)
        edits.append((f"renamed {name}", mutate))
    # Header structure.
    edits.append(("header not an object", lambda: join_file([1, 2], data)))
    edits.append(("metadata not str->str", lambda: join_file({**split_file(raw)[0], "__metadata__": {"a": 1}}, data)))
    edits.append(("no metadata", lambda: join_file({k: v for k, v in split_file(raw)[0].items() if k != "__metadata__"}, data)))
    edits.append(("huge header length", lambda: struct.pack("<Q", 2**62) + raw[8:]))
    edits.append(("header length past the end", lambda: struct.pack("<Q", len(raw)) + raw[8:]))
    edits.append(("empty file", lambda: b""))

    for what, mutate in edits:
        write(work, mutate())
        attempt(model, work, target, what)
    assert len(edits) >= 130


def test_structural_and_metadata_edits(original, target, tmp_path):
    model, directory, _ = original
    raw = (directory / "model.safetensors").read_bytes()
    header, _, _ = split_file(raw)
    names = sorted(k for k in header if k != "__metadata__")
    qparam = "model.layers.0.mlp.experts.gate_up_proj"
    dense = "model.layers.0.self_attn.q_proj.weight"
    work = tmp_path / "ckpt"
    shutil.copytree(directory, work)
    edits = []

    for name in names[::3]:
        edits.append((f"missing tensor {name}", dict(edit_tensors=lambda t, m, n=name: t.pop(n))))
    edits += [
        ("extra tensor, not in manifest", dict(edit_tensors=lambda t, m: t.__setitem__("model.extra", torch.zeros(4)))),
        ("extra tensor, in the manifest", dict(edit_tensors=lambda t, m: (
            t.__setitem__("model.extra", torch.zeros(4)),
            m.__setitem__(ckpt.META_MANIFEST, json.dumps({**json.loads(m[ckpt.META_MANIFEST]),
                                                         "model.extra": ckpt.manifest_entry(torch.zeros(4), ckpt.tensor_digest(torch.zeros(4)))}))))),
        ("extra inner tensor", dict(edit_tensors=lambda t, m: (
            t.__setitem__(dense + ".__milo__.bogus", torch.zeros(4)),
            m.__setitem__(ckpt.META_MANIFEST, json.dumps({**json.loads(m[ckpt.META_MANIFEST]),
                                                         dense + ".__milo__.bogus": ckpt.manifest_entry(torch.zeros(4), ckpt.tensor_digest(torch.zeros(4)))}))))),
        ("inner tensor of an unknown parameter", dict(edit_tensors=lambda t, m: t.__setitem__("model.nope.__milo__.qdata", t[dense + ".__milo__.qdata"].clone()))),
        ("float tensor stored twice (also quantized)", dict(edit_tensors=lambda t, m: t.__setitem__(dense, torch.zeros(64, 64)))),
    ]
    # Consistent edits (manifest updated too): the data no longer fits the attributes or the model.
    def retype(name, fn):
        def edit(t, m):
            t[name] = fn(t[name])
            manifest = json.loads(m[ckpt.META_MANIFEST])
            manifest[name] = ckpt.manifest_entry(t[name], ckpt.tensor_digest(t[name]))
            m[ckpt.META_MANIFEST] = json.dumps(manifest)
        return edit
    for name in (qparam + ".__milo__.qdata", qparam + ".__milo__.scales", dense + ".__milo__.ut", dense + ".__milo__.v_zeros",
                 "model.norm.weight", "lm_head.weight", "model.layers.0.mlp.gate.weight"):
        edits.append((f"consistent dtype change of {name}", dict(edit_tensors=retype(name, lambda x: x.view(torch.int32) if x.dtype == torch.float32 else x.view(torch.float32)))))
        edits.append((f"consistent shape change of {name}", dict(edit_tensors=retype(name, lambda x: x.unsqueeze(0)))))
        edits.append((f"consistent size change of {name}", dict(edit_tensors=retype(name, lambda x: torch.cat([x.reshape(-1), x.reshape(-1)[:1]])))))
        edits.append((f"value change of {name} (digest kept)", dict(edit_tensors=lambda t, m, n=name: t.__setitem__(n, flip_first_bit(t[n])))))
    # Format version.
    # ("1" with a fresh digest is a valid format-1 checkpoint of other codes: test_serialization's
    # test_format_1_checkpoint_loads_repacked)
    for version in ("3", "0", "999999999", "2.0", "two", "", "-1", " 2"):
        edits.append((f"format version {version!r}", dict(edit_metadata=lambda m, v=version: m.__setitem__(ckpt.META_VERSION, v))))
    edits.append(("no format version", dict(edit_metadata=lambda m: m.pop(ckpt.META_VERSION))))
    edits.append(("version edited, digest kept", dict(edit_metadata=lambda m: m.__setitem__(ckpt.META_VERSION, "1"), redigest=False)))
    # Attributes of a quantized parameter.
    def params_edit(fqn, key, value):
        return json_edit(ckpt.META_PARAMS, lambda p: p[fqn].__setitem__(key, value))
    for fqn in (qparam, dense):
        for key, value in (("ranks", [3] * 4 if fqn == qparam else [3]), ("ranks", [8] * 3), ("ranks", [-1] * 4), ("ranks", "8"),
                           ("group_size", 32), ("group_size", 48), ("group_size", 0), ("shape", [64, 128]),
                           ("shape", [4, 64, 64, 1]), ("dtype", "bfloat16"), ("dtype", "int32"), ("comp_bits", 8),
                           ("comp_bits", None), ("comp_bits", 4), ("comp_group_size", 64), ("comp_group_size", 0),
                           ("comp_group_size", None)):
            edits.append((f"{fqn} {key}={value!r}", dict(edit_metadata=params_edit(fqn, key, value))))
        edits.append((f"{fqn} attributes removed", dict(edit_metadata=json_edit(ckpt.META_PARAMS, lambda p, f=fqn: p.pop(f)))))
        edits.append((f"{fqn} extra attribute", dict(edit_metadata=params_edit(fqn, "transposed", True))))
    # Manifest and other metadata.
    edits += [
        ("manifest digest changed", dict(edit_metadata=json_edit(ckpt.META_MANIFEST, lambda m: m[names[0]].__setitem__(2, "0" * 32)))),
        ("manifest entry removed", dict(edit_metadata=json_edit(ckpt.META_MANIFEST, lambda m: m.pop(names[1])))),
        ("manifest dtype changed", dict(edit_metadata=json_edit(ckpt.META_MANIFEST, lambda m: m[names[2]].__setitem__(0, "F64")))),
        ("manifest shape changed", dict(edit_metadata=json_edit(ckpt.META_MANIFEST, lambda m: m[names[3]].__setitem__(1, [1])))),
        ("manifest not a dict", dict(edit_metadata=lambda m: m.__setitem__(ckpt.META_MANIFEST, "[]"))),
        ("manifest not JSON", dict(edit_metadata=lambda m: m.__setitem__(ckpt.META_MANIFEST, "{"))),
        ("params not JSON", dict(edit_metadata=lambda m: m.__setitem__(ckpt.META_PARAMS, "nope"))),
        ("no params", dict(edit_metadata=lambda m: m.pop(ckpt.META_PARAMS))),
        ("no manifest", dict(edit_metadata=lambda m: m.pop(ckpt.META_MANIFEST))),
        ("config edited, digest kept", dict(edit_metadata=json_edit(ckpt.META_CONFIG, lambda c: c.__setitem__("experts_implementation", "eager")), redigest=False)),
        ("params edited, digest kept", dict(edit_metadata=params_edit(dense, "group_size", 32), redigest=False)),
        ("no digest", dict(edit_metadata=lambda m: m.pop(ckpt.META_DIGEST), redigest=False)),
        ("aliases point nowhere", dict(edit_metadata=lambda m: m.__setitem__(ckpt.META_ALIASES, json.dumps({"lm_head.weight": "model.nope"})))),
        ("alias of a stored tensor", dict(edit_metadata=lambda m: m.__setitem__(ckpt.META_ALIASES, json.dumps({"lm_head.weight": "model.norm.weight"})))),
        ("alias the model lacks", dict(edit_metadata=lambda m: m.__setitem__(ckpt.META_ALIASES, json.dumps({"model.ghost": "model.norm.weight"})))),
        ("aliases not JSON", dict(edit_metadata=lambda m: m.__setitem__(ckpt.META_ALIASES, "{{"))),
    ]
    for what, kwargs in edits:
        write(work, rebuild(raw, **kwargs))
        attempt(model, work, target, what)
    assert len(edits) >= 100


def test_sharded_checkpoint_edits(original, target, tmp_path):
    model, _, sharded = original
    index_text = (sharded / "model.safetensors.index.json").read_text()
    index = json.loads(index_text)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    other = tmp_path / "other"
    other_model = tiny_moe("mixtral", seed=8, **MODEL)
    quantize_(other_model, milo_int3(DenseSparseRank(8, 4), iters=0, quantizer="rtn", compensator_bits=3,
                                     compensator_group_size=32), progress=False)
    save_quantized(other_model, other, max_shard_size="40KB")
    other_shards = sorted(p.name for p in other.glob("model-*.safetensors"))

    def setup():
        work = tmp_path / "work"
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(sharded, work)
        return work

    def index_edit(fn):
        def mutate(work):
            data = json.loads(index_text)
            fn(data)
            (work / "model.safetensors.index.json").write_text(json.dumps(data))
        return mutate

    first = sorted(index["weight_map"])[0]
    edits = [
        ("shard deleted", lambda w: (w / shards[1]).unlink()),
        ("shard truncated", lambda w: (w / shards[0]).write_bytes((w / shards[0]).read_bytes()[:-10])),
        ("shard from another checkpoint", lambda w: shutil.copyfile(other / other_shards[1], w / shards[1])),
        ("index entry removed", index_edit(lambda d: d["weight_map"].pop(first))),
        ("index entry to the wrong shard", index_edit(lambda d: d["weight_map"].__setitem__(
            first, next(s for s in shards if s != index["weight_map"][first])))),
        ("index names a missing file", index_edit(lambda d: d["weight_map"].__setitem__(first, "model-missing.safetensors"))),
        ("index names a file outside", index_edit(lambda d: d["weight_map"].__setitem__(first, "../" + shards[0]))),
        ("index extra entry", index_edit(lambda d: d["weight_map"].__setitem__("model.extra", shards[0]))),
        ("index without weight_map", index_edit(lambda d: d.pop("weight_map"))),
        ("index not JSON", lambda w: (w / "model.safetensors.index.json").write_text("{")),
        ("index deleted", lambda w: (w / "model.safetensors.index.json").unlink()),
    ]
    for what, mutate in edits:
        work = setup()
        mutate(work)
        attempt(model, work, target, what)
    # The untouched sharded checkpoint loads.
    work = setup()
    assert same_as(model, load_quantized(work))


def test_corrupt_checkpoint_through_from_pretrained(original, tmp_path):
    from transformers import AutoModelForCausalLM

    model, directory, _ = original
    raw = (directory / "model.safetensors").read_bytes()
    work = tmp_path / "ckpt"
    shutil.copytree(directory, work)
    for expected, mutated in (
        ("checksum mismatch", raw[:-100] + bytes([raw[-100] ^ 1]) + raw[-99:]),
        ("truncated", raw[: len(raw) // 2]),
        ("corrupt header", raw[:9] + b"\xff" + raw[10:]),
        ("unknown MiLo format version 7", rebuild(raw, edit_metadata=lambda m: m.__setitem__(ckpt.META_VERSION, "7"))),
    ):
        write(work, mutated)
        with pytest.raises(CheckpointError, match=expected):
            AutoModelForCausalLM.from_pretrained(work)
