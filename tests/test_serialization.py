"""save_quantized / load_quantized: bit-exact round trips, sharding, tied weights, atomic saves."""

import copy
import json
import os

import pytest
import torch

import milo_tensor.checkpoint as ckpt
import milo_tensor.serialization as ser
from milo_tensor import (
    CheckpointError,
    DenseSparseRank,
    MiLoInt3Tensor,
    load_quantized,
    milo_int3,
    quantize_,
    save_quantized,
)
from milo_tensor.quant.packing import pack_int3_v1, unpack_int3, unpack_int3_v1
from models import tiny_moe

CASES = {
    # family, model overrides, config: float / int3 / int8 compensators, HQQ and RTN, rank 0 (empty U, V)
    "mixtral-hqq": ("mixtral", {}, dict(rank_fn=DenseSparseRank(8, 4), iters=1)),
    "qwen2_moe-int3comp": ("qwen2_moe", {}, dict(rank_fn=DenseSparseRank(8, 4), iters=1, quantizer="rtn",
                                                 compensator_bits=3, compensator_group_size=32)),
    "qwen3-int8comp": ("qwen3_moe", {}, dict(rank_fn=DenseSparseRank(8, 4), iters=1, quantizer="rtn",
                                                  compensator_bits=8, compensator_group_size=32)),
    "olmoe-rank0-tied": ("olmoe", {"tie_word_embeddings": True}, dict(rank_fn=0, iters=0, quantizer="rtn")),
}


def quantized(case):
    family, overrides, kwargs = CASES[case]
    model = tiny_moe(family, **overrides)
    config = milo_int3(**kwargs)
    quantize_(model, config, progress=False)
    return model, config


@pytest.fixture(scope="module")
def models():
    return {case: quantized(case) for case in CASES}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def inner(t):
    if isinstance(t, MiLoInt3Tensor):
        names, attrs = t.__tensor_flatten__()
        return {n: getattr(t, n) for n in names}, attrs
    return {"": t}, None


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        (ta, attrs_a), (tb, attrs_b) = inner(sa[name]), inner(sb[name])
        assert type(sa[name]) is type(sb[name]), name
        assert attrs_a == attrs_b, name
        assert ta.keys() == tb.keys(), name
        for key in ta:
            assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), f"{name} {key}"


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def rewrite_as_format_1(directory, names=None) -> list[str]:
    """Rewrite the (format-2) weight files ``names`` of a checkpoint (default: all) as format 1 stored
    them: the int3 words -- ``qdata``, and ``ut`` / ``v`` where ``comp_bits`` is 3 -- in the format-1
    layout, ``milo_format_version`` "1", the manifests, metadata digests, the index's shard digests
    and config.json's format_version to match. Returns the tensors rewritten."""
    paths = [directory / n for n in names] if names else sorted(directory.glob("*.safetensors"))
    files, rewritten = {}, {}
    for path in paths:
        header = ckpt.read_header(path)
        with open(path, "rb") as fh:
            tensors = {n: ckpt.read_tensor(fh, header, n) for n in header.entries}
        params = json.loads(header.metadata[ckpt.META_PARAMS])
        for name, t in tensors.items():
            fqn, sep, leaf = name.partition(ckpt.MILO_SEP)
            if sep and (leaf == "qdata" or (leaf in ("ut", "v") and params[fqn]["comp_bits"] == 3)):
                tensors[name] = rewritten[name] = pack_int3_v1(unpack_int3(t))
        files[path] = (header.metadata, tensors)
    digests = {}
    for path, (md, tensors) in files.items():
        manifest = json.loads(md[ckpt.META_MANIFEST])  # save_quantized's shards each list every tensor
        for name, t in rewritten.items():
            if name in manifest:
                manifest[name] = ckpt.manifest_entry(t, ckpt.tensor_digest(t))
        md = {**md, ckpt.META_MANIFEST: ckpt.canonical_json(manifest), ckpt.META_VERSION: "1"}
        md[ckpt.META_DIGEST] = ckpt.metadata_digest(md)
        ckpt.write_safetensors(path, tensors, md)
        digests[path.name] = md[ckpt.META_DIGEST]
    index = directory / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["metadata"]["milo_shards"].update(digests)
        if names is None:
            data["metadata"][ckpt.META_VERSION] = 1
        index.write_text(json.dumps(data))
    config = directory / "config.json"
    if config.exists() and names is None:
        data = json.loads(config.read_text())
        data["quantization_config"]["format_version"] = 1
        config.write_text(json.dumps(data))
    return sorted(rewritten)


def assert_format_1_on_disk(directory, model, rewritten):
    """The rewritten files are format 1 and their int3 words differ from the model's (so a loader that
    skipped repacking would load other weights)."""
    for path in directory.glob("*.safetensors"):
        header = ckpt.read_header(path)
        assert header.metadata[ckpt.META_VERSION] == "1"
        with open(path, "rb") as fh:
            for name in header.entries:
                if name in rewritten:
                    fqn, _, leaf = name.partition(ckpt.MILO_SEP)
                    stored, held = ckpt.read_tensor(fh, header, name), getattr(model.get_parameter(fqn), leaf)
                    assert stored.shape == held.shape and not torch.equal(stored, held), name
                    assert torch.equal(unpack_int3(held), unpack_int3_v1(stored)), name


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_bit_exact(case, models, tmp_path, gen):
    model, config = models[case]
    ids = torch.randint(3, 256, (2, 7), generator=gen)
    save_quantized(model, tmp_path, config=config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = load_quantized(tmp_path)
    assert_same_model(model, loaded)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert loaded.config._experts_implementation == "milo"
    assert not loaded.training
    assert not any(b.is_meta for b in loaded.buffers())
    # the header records version, config and every quantized tensor's attributes
    header = ckpt.read_header(tmp_path / "model.safetensors")
    md = header.metadata
    assert md["milo_format_version"] == "2" and md["format"] == "pt"
    assert json.loads(md["milo_config"]) == ser.config_to_dict(config)
    params = json.loads(md["milo_params"])
    stack = "model.layers.0.mlp.experts.gate_up_proj"
    assert params[stack]["ranks"] == list(model.get_parameter(stack).ranks)
    assert params[stack]["comp_bits"] == config.compensator_bits
    assert set(json.loads(md["milo_manifest"])) == set(header.entries)
    # no pickle anywhere: every file is JSON or safetensors
    for p in tmp_path.iterdir():
        assert not p.read_bytes().startswith(b"\x80")


def test_tied_embeddings_stay_tied(models, tmp_path):
    model, config = models["olmoe-rank0-tied"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_quantized(model, tmp_path)
    header = ckpt.read_header(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in header.entries
    assert json.loads(header.metadata["milo_aliases"]) == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_quantized(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    # rank 0 everywhere: the empty U, V are not stored, and come back empty
    assert not any(n.endswith((".__milo__.ut", ".__milo__.v")) for n in header.entries)
    assert loaded.model.layers[0].self_attn.q_proj.weight.ut.shape == (0, 64)
    assert_same_model(model, loaded)


def test_sharded_save_loads(models, tmp_path, gen):
    model, config = models["mixtral-hqq"]
    files = save_quantized(model, tmp_path, max_shard_size="60KB")
    assert len(files) > 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert not (tmp_path / "model.safetensors").exists()
    # the inner tensors of one quantized parameter share a shard
    stack = "model.layers.1.mlp.experts.down_proj.__milo__."
    assert len({f for n, f in index["weight_map"].items() if n.startswith(stack)}) == 1
    loaded = load_quantized(tmp_path)
    assert_same_model(model, loaded)
    ids = torch.randint(3, 256, (1, 9), generator=gen)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_load_into_given_model(models, tmp_path):
    model, config = models["qwen2_moe-int3comp"]
    save_quantized(model, tmp_path)
    target = tiny_moe("qwen2_moe", seed=5)  # float, other values: everything gets replaced
    out = load_quantized(tmp_path, model=target)
    assert out is target
    assert_same_model(model, target)
    assert target.config._experts_implementation == "milo"


def test_save_over_previous_checkpoints(models, tmp_path):
    """single -> sharded -> single -> sharded: the latest always loads, nothing stale is left."""
    a, _ = models["mixtral-hqq"]
    b, _ = models["qwen2_moe-int3comp"]
    for model, shard in ((a, "2GB"), (b, "60KB"), (a, "2GB"), (a, "50KB"), (b, "40KB")):
        files = save_quantized(model, tmp_path, max_shard_size=shard)
        names = {p.name for p in tmp_path.iterdir()}
        expected = {f.name for f in files} | {"config.json", "generation_config.json"}
        if len(files) > 1:
            expected.add("model.safetensors.index.json")
        assert names == expected
        assert_same_model(model, load_quantized(tmp_path))


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("fail_at", ["write", "replace"])
def test_failed_save_leaves_previous_checkpoint(models, tmp_path, monkeypatch, sharded, fail_at):
    a, _ = models["mixtral-hqq"]
    b, _ = models["qwen2_moe-int3comp"]
    save_quantized(a, tmp_path, max_shard_size="60KB" if sharded else "2GB")
    before = snapshot(tmp_path)

    calls = {"n": 0, "fail": 1}
    if fail_at == "write":
        real = ser.write_safetensors

        def flaky(path, tensors, metadata):  # the file is written, then the save dies
            calls["n"] += 1
            if calls["n"] == calls["fail"]:
                real(path, tensors, metadata)
                raise OSError("disk full (injected)")
            return real(path, tensors, metadata)

        monkeypatch.setattr(ser, "write_safetensors", flaky)
    else:
        real_replace = os.replace

        def flaky_replace(src, dst):
            # fail at the commit: model.safetensors, or the index of a sharded save
            if os.path.basename(dst) in ("model.safetensors", "model.safetensors.index.json"):
                raise OSError("crash (injected)")
            return real_replace(src, dst)

        monkeypatch.setattr(ser.os, "replace", flaky_replace)
    for shard, fail in (("2GB", 1), ("40KB", 3)):
        calls["n"], calls["fail"] = 0, fail
        with pytest.raises(OSError, match="injected"):
            save_quantized(b, tmp_path, max_shard_size=shard)
        assert snapshot(tmp_path) == before  # byte-identical, no temporary files left
    monkeypatch.undo()
    assert_same_model(a, load_quantized(tmp_path))


def test_mismatched_model_is_refused_and_untouched(models, tmp_path):
    model, _ = models["mixtral-hqq"]
    save_quantized(model, tmp_path)
    for target in (tiny_moe("mixtral", hidden_size=128), tiny_moe("mixtral", num_hidden_layers=3),
                   tiny_moe("qwen3_moe"), tiny_moe("mixtral").to(torch.bfloat16)):
        before = {n: t.clone() for n, t in target.state_dict().items()}
        params = dict(target.named_parameters())
        with pytest.raises(CheckpointError, match="model.safetensors"):
            load_quantized(tmp_path, model=target)
        assert dict(target.named_parameters()).keys() == params.keys()
        assert all(p is params[n] for n, p in target.named_parameters())
        assert all(torch.equal(before[n], t) for n, t in target.state_dict().items())


def test_unknown_version_and_missing_dir(models, tmp_path):
    model, _ = models["mixtral-hqq"]
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_quantized(tmp_path)
    save_quantized(model, tmp_path)
    path = tmp_path / "model.safetensors"
    header = ckpt.read_header(path)
    tensors = {}
    with open(path, "rb") as fh:
        for name in header.entries:
            tensors[name] = ckpt.read_tensor(fh, header, name)
    for version in ("3", "0"):
        md = {**header.metadata, "milo_format_version": version}
        ckpt.write_safetensors(path, tensors, {**md, ckpt.META_DIGEST: ckpt.metadata_digest(md)})
        with pytest.raises(CheckpointError, match=rf"unknown MiLo format version {version} \(this milo_tensor reads \[1, 2\]\)"):
            load_quantized(tmp_path)


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("case", ["mixtral-hqq", "qwen2_moe-int3comp"])
def test_format_1_checkpoint_loads_repacked(case, sharded, models, tmp_path, gen):
    """A format-1 checkpoint (the same codes in the old int3 layout) loads as exactly the weights of
    the format-2 checkpoint of the same model, and saves again as format 2."""
    model, config = models[case]
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    for directory in (v2, v1):
        save_quantized(model, directory, config=config, max_shard_size="60KB" if sharded else "2GB")
    rewritten = rewrite_as_format_1(v1)
    int3_comp = config.compensator_bits == 3
    assert any(n.endswith(".__milo__.qdata") for n in rewritten)
    assert any(n.endswith(".__milo__.ut") for n in rewritten) == int3_comp
    assert any(n.endswith(".__milo__.v") for n in rewritten) == int3_comp
    assert_format_1_on_disk(v1, model, rewritten)
    assert ckpt.verify_checkpoint(v1).version == 1 and ckpt.verify_checkpoint(v2).version == 2

    old, new = load_quantized(v1), load_quantized(v2)
    assert_same_model(new, old)
    assert_same_model(model, old)
    ids = torch.randint(3, 256, (2, 9), generator=gen)
    expected = logits(model, ids)
    assert torch.equal(logits(old, ids), expected) and torch.equal(logits(new, ids), expected)
    # saved again: format 2, byte for byte the format-2 checkpoint
    save_quantized(old, tmp_path / "again", config=config, max_shard_size="60KB" if sharded else "2GB")
    weights = lambda d: {n: b for n, b in snapshot(d).items() if n.endswith((".safetensors", ".index.json"))}  # noqa: E731
    assert weights(tmp_path / "again") == weights(v2)
    # (the manifest holds digests of the format-1 bytes: they are checked as stored) a corrupted one is refused
    path = max(v1.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_quantized(v1)


def test_save_refuses_what_it_cannot_store(tmp_path):
    model = tiny_moe("mixtral")
    quantize_(model, milo_int3(0, iters=0, quantizer="rtn"), progress=False)
    w = model.model.layers[0].self_attn.q_proj.weight
    with pytest.raises(ValueError, match="transposed"):
        ser.flatten_state_dict({"w": w.t()})
    with pytest.raises(ValueError, match="size"):
        save_quantized(model, tmp_path, max_shard_size="lots")
    assert ser.parse_size("2GB") == 2 * 10**9 and ser.parse_size("1GiB") == 2**30 and ser.parse_size(10) == 10


def test_config_dict_round_trip():
    from milo_tensor.quant.rank import KurtosisRank

    config = milo_int3(KurtosisRank(mean_rank=8, dense_rank=32), group_size=128, iters=3, compensator_bits=3)
    again = ser.config_from_dict(json.loads(json.dumps(ser.config_to_dict(config))))
    assert again == config
    custom = milo_int3(lambda info: 4)
    assert ser.config_to_dict(custom)["rank_fn"]["policy"] == "custom"
    with pytest.raises(ValueError, match="custom rank policy"):
        ser.config_from_dict(ser.config_to_dict(custom))


def test_deepcopy_of_loaded_model_runs(models, tmp_path, gen):
    model, _ = models["qwen3-int8comp"]
    save_quantized(model, tmp_path)
    loaded = copy.deepcopy(load_quantized(tmp_path))
    ids = torch.randint(3, 256, (1, 5), generator=gen)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_plain_torch_module_round_trip(tmp_path, gen):
    """Not only transformers models: any module with MiLo Linear weights saves and loads into a skeleton."""

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64, bias=False))

    model = build()
    quantize_(model, milo_int3(8, iters=2), progress=False)
    assert isinstance(model[0].weight, MiLoInt3Tensor)
    save_quantized(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no config.json to write
    skeleton = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64, bias=False))
    loaded = load_quantized(tmp_path, model=skeleton)
    assert_same_model(model, loaded)
    x = torch.randn(5, 64, generator=gen)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        # and the loaded weights compute what their dequantized float weights say
        ref = torch.nn.functional.linear(x, model[0].weight.dequantize(), model[0].bias)
        torch.testing.assert_close(torch.nn.functional.linear(x, loaded[0].weight, loaded[0].bias), ref)


def test_corrupt_config_json_is_a_checkpoint_error(models, tmp_path):
    model, _ = models["mixtral-hqq"]
    save_quantized(model, tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "mixtral", "hidden_size": ')
    with pytest.raises(CheckpointError, match="config.json"):
        load_quantized(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 128}))
    with pytest.raises(CheckpointError, match="model.safetensors"):  # a config that does not fit the tensors
        load_quantized(tmp_path)
