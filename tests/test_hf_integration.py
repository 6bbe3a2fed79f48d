"""transformers: the "milo" quantization method (from_pretrained / save_pretrained of MiLo checkpoints)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import milo_tensor
import milo_tensor.checkpoint as ckpt
from milo_tensor import (
    CheckpointError,
    DenseSparseRank,
    MiLoHfConfig,
    MiLoInt3Tensor,
    load_quantized,
    milo_int3,
    quantize_,
    save_quantized,
)
from milo_tensor.integrations.hf_quantizer import MiLoHfQuantizer
from milo_tensor.quant.packing import FORMAT_VERSION
from models import tiny_moe
from test_serialization import assert_format_1_on_disk, assert_same_model, logits, rewrite_as_format_1

CONFIG = dict(rank_fn=DenseSparseRank(8, 4), iters=1, quantizer="rtn")


@pytest.fixture(scope="module")
def quantized():
    model = tiny_moe("qwen2_moe")
    config = milo_int3(**CONFIG)
    quantize_(model, config, progress=False)
    return model, config


def test_registered_on_import():
    assert milo_tensor.MiLoHfConfig is AUTO_QUANTIZATION_CONFIG_MAPPING["milo"]
    assert AUTO_QUANTIZER_MAPPING["milo"] is MiLoHfQuantizer


@pytest.mark.parametrize("shard", ["2GB", "50KB"])
def test_from_pretrained_of_save_quantized(quantized, tmp_path, gen, shard):
    model, config = quantized
    save_quantized(model, tmp_path, config=config, max_shard_size=shard)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "milo"
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert_same_model(model, loaded)
    ids = torch.randint(3, 256, (2, 9), generator=gen)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert loaded.config._experts_implementation == "milo"
    assert loaded.is_quantized and isinstance(loaded.hf_quantizer, MiLoHfQuantizer)
    out = loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_save_pretrained_round_trips(quantized, tmp_path, gen):
    model, config = quantized
    ids = torch.randint(3, 256, (1, 8), generator=gen)
    # a model quantized in memory (no hf_quantizer yet) ...
    model.save_pretrained(tmp_path / "a")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert_same_model(model, a)
    # ... and one that from_pretrained returned, saved sharded by transformers
    a.save_pretrained(tmp_path / "b", max_shard_size="60KB")
    assert len(list((tmp_path / "b").glob("model-*.safetensors"))) > 1
    for directory in ("a", "b"):
        for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / directory), load_quantized(tmp_path / directory)):
            assert_same_model(model, loaded)
            assert torch.equal(logits(loaded, ids), logits(model, ids))
    # load_quantized's result saves again through save_pretrained
    c = load_quantized(tmp_path / "b")
    c.save_pretrained(tmp_path / "c")
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(tmp_path / "c"))


def test_from_pretrained_with_dtype_casts_float_and_quantized(quantized, tmp_path):
    model, config = quantized
    save_quantized(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    w = loaded.model.layers[0].self_attn.q_proj.weight
    assert isinstance(w, MiLoInt3Tensor) and w.dtype == torch.bfloat16 and w.scales.dtype == torch.bfloat16
    ref = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w.qdata, ref.qdata)
    ids = torch.randint(3, 256, (1, 6))
    assert torch.isfinite(logits(loaded, ids).float()).all()


def test_quantize_while_loading_a_float_model(tmp_path, gen):
    float_model = tiny_moe("mixtral")
    float_model.save_pretrained(tmp_path / "float")
    config = milo_int3(**CONFIG)
    on_load = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=MiLoHfConfig(config=config))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    quantize_(reference, config, progress=False)
    assert_same_model(reference, on_load)
    on_load.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert_same_model(reference, again)
    ids = torch.randint(3, 256, (1, 6), generator=gen)
    assert torch.equal(logits(again, ids), logits(reference, ids))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "olmoe"])
def test_every_family_round_trips_through_transformers(family, tmp_path, gen):
    """save_quantized -> from_pretrained -> save_pretrained -> from_pretrained / load_quantized, per family
    (legacy per-expert key conversions, shared experts, dense first layers, MLA attention)."""
    model = tiny_moe(family)
    quantize_(model, milo_int3(**CONFIG), progress=False)
    save_quantized(model, tmp_path / "a")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    a.save_pretrained(tmp_path / "b")
    ids = torch.randint(3, 256, (2, 7), generator=gen)
    reference = logits(model, ids)
    for loaded in (a, AutoModelForCausalLM.from_pretrained(tmp_path / "b"), load_quantized(tmp_path / "b")):
        assert_same_model(model, loaded)
        assert torch.equal(logits(loaded, ids), reference)


@pytest.mark.parametrize("comp_bits", [None, 3])
def test_from_pretrained_of_a_format_1_checkpoint(tmp_path, gen, comp_bits):
    """config.json format_version 1 and format-1 headers: from_pretrained repacks the int3 words, and
    the model it returns equals the format-2 checkpoint's; save_pretrained writes format 2."""
    model = tiny_moe("mixtral")
    extra = dict(compensator_bits=3, compensator_group_size=32) if comp_bits == 3 else {}
    quantize_(model, milo_int3(**CONFIG, **extra), progress=False)
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    for directory in (v2, v1):
        save_quantized(model, directory, max_shard_size="80KB")
    rewritten = rewrite_as_format_1(v1)
    assert any(n.endswith(".__milo__.ut") for n in rewritten) == (comp_bits == 3)
    assert_format_1_on_disk(v1, model, rewritten)
    assert json.loads((v1 / "config.json").read_text())["quantization_config"]["format_version"] == 1

    old, info = AutoModelForCausalLM.from_pretrained(v1, output_loading_info=True)
    assert not any(info.values()), info
    new = AutoModelForCausalLM.from_pretrained(v2)
    assert_same_model(new, old)
    assert_same_model(model, old)
    assert old.model.layers[0].mlp.experts.gate_up_proj.comp_bits == comp_bits
    ids = torch.randint(3, 256, (2, 9), generator=gen)
    expected = logits(model, ids)
    assert torch.equal(logits(old, ids), expected) and torch.equal(logits(new, ids), expected)
    # the loaded model holds format-2 words, and says so when saved
    assert old.config.quantization_config.format_version == FORMAT_VERSION == 2
    old.save_pretrained(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["quantization_config"]["format_version"] == 2
    assert ckpt.verify_checkpoint(tmp_path / "again").version == 2
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "again"), load_quantized(tmp_path / "again")):
        assert_same_model(model, loaded)
        assert torch.equal(logits(loaded, ids), expected)


def test_from_pretrained_refuses_unknown_or_mismatched_format_version(quantized, tmp_path):
    model, config = quantized
    save_quantized(model, tmp_path, config=config)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    for version, message in ((3, r"config.json: unknown MiLo format version 3 \(this milo_tensor reads \[1, 2\]\)"),
                             (1, r"config.json: quantization_config.format_version is 1, the weight files' headers say 2")):
        cfg["quantization_config"]["format_version"] = version
        path.write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=message):
            AutoModelForCausalLM.from_pretrained(tmp_path)
