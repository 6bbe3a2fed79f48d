"""`milo quantize`: layer-by-layer quantization of a model folder; kill and resume; `--help` everywhere."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import milo_tensor.checkpoint as ckpt
from milo_tensor import DenseSparseRank, load_quantized, milo_int3, quantize_
from milo_tensor.cli import build_parser, main
from milo_tensor.streaming import ABORT_ENV
from models import tiny_moe
from test_serialization import assert_same_model, logits, rewrite_as_format_1, snapshot

ARGS = ["--iters", "1", "--dense-rank", "8", "--sparse-rank", "4", "--no-progress"]
CONFIG = milo_int3(DenseSparseRank(8, 4), iters=1)


def assert_same_files(a, b):
    sa, sb = snapshot(a), snapshot(b)
    assert sa.keys() == sb.keys()
    differ = [name for name in sa if sa[name] != sb[name]]
    detail = {}
    for name in differ:
        if name.endswith(".safetensors"):
            ha, hb = ckpt.read_header(a / name), ckpt.read_header(b / name)
            ma, mb = (json.loads(h.metadata[ckpt.META_MANIFEST]) for h in (ha, hb))
            detail[name] = [k for k in ma if ma[k] != mb.get(k)] or "metadata"
    assert not differ, detail


def float_folder(path, family="mixtral", max_shard_size="2GB", **overrides):
    tiny_moe(family, **overrides).save_pretrained(path, max_shard_size=max_shard_size)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    return path


def test_help_for_every_subcommand(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert "quantize" in commands
    for argv in [["--help"]] + [[name, "--help"] for name in commands]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        assert "usage: milo" in capsys.readouterr().out
    assert main([]) == 2  # no command: the overview
    text = parser._subparsers._group_actions[0].choices["quantize"].format_help()
    for option in ("--group-size", "--iters", "--rank-policy", "--dense-rank", "--sparse-rank",
                   "--compensator-dtype", "--device", "--quantizer"):
        assert option in text


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe", "mixtral"])
def test_quantize_folder_equals_in_memory_quantize(tmp_path, capsys, gen, family):
    # a sharded source (an index and several files) for one family
    src = float_folder(tmp_path / "src", family, max_shard_size="100KB" if family == "deepseek_v3" else "2GB")
    assert (src / "model.safetensors.index.json").exists() == (family == "deepseek_v3")
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "mean rel. error" in printed and "| expert" in printed and "| dense" in printed

    reference = AutoModelForCausalLM.from_pretrained(src)
    quantize_(reference, CONFIG, progress=False)
    loaded = load_quantized(out)
    assert_same_model(reference, loaded)
    via_hf = AutoModelForCausalLM.from_pretrained(out)
    assert_same_model(reference, via_hf)
    ids = torch.randint(3, 256, (1, 8), generator=gen)
    assert torch.equal(logits(via_hf, ids), logits(reference, ids))
    assert torch.equal(logits(loaded, ids), logits(reference, ids))

    # one shard per decoder layer plus one for the rest, an index, config with quantization_config
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert shards == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "milo"
    assert config["quantization_config"]["milo_config"]["iters"] == 1
    assert (out / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
    assert not list(out.glob(".milo-tmp-*"))


def test_interrupt_and_resume_give_identical_files(tmp_path, monkeypatch, capsys):
    src = float_folder(tmp_path / "src", "mixtral", num_hidden_layers=3)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["quantize", str(src), str(full), *ARGS]) == 0
    capsys.readouterr()

    monkeypatch.setenv(ABORT_ENV, "1")
    assert main(["quantize", str(src), str(part), *ARGS]) == 130  # interrupted after layer 0
    # the finished layer's shard, and the (released) lock file of the interrupted run
    assert sorted(p.name for p in part.iterdir()) == [".milo-quantize.lock", "model-00001-of-00004.safetensors"]
    (part / ".milo-tmp-123-model-00002-of-00004.safetensors").write_bytes(b"half a shard")  # killed mid-write
    assert main(["quantize", str(src), str(part), *ARGS]) == 130  # resumes: layer 1, interrupted again
    assert "interrupted" in capsys.readouterr().err
    # a damaged completed shard is redone, not trusted
    shard = part / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    monkeypatch.delenv(ABORT_ENV)
    assert main(["quantize", str(src), str(part), *ARGS]) == 0
    assert "layers quantized now: 3, resumed from an earlier run: 1" in capsys.readouterr().out
    assert_same_files(part, full)  # byte-identical, every file
    # a finished folder: nothing to do, same bytes
    assert main(["quantize", str(src), str(part), *ARGS]) == 0
    assert "layers quantized now: 0, resumed from an earlier run: 4" in capsys.readouterr().out
    assert_same_files(part, full)


def test_resume_redoes_shards_of_format_1(tmp_path, capsys, gen):
    """A run of a format-1 milo_tensor, resumed by this one: its shards (valid, but of the old int3
    layout) are quantized again, never mixed with format-2 shards; the result is what one run writes."""
    src = float_folder(tmp_path / "src", "mixtral", num_hidden_layers=3)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["quantize", str(src), str(full), *ARGS]) == 0
    assert main(["quantize", str(src), str(part), *ARGS]) == 0
    capsys.readouterr()
    # layers 0 and 1 as a format-1 run left them; layer 2 of this format; the rest never written
    assert rewrite_as_format_1(part, ["model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors"])
    for name in ("model-00004-of-00004.safetensors", "model.safetensors.index.json", "config.json"):
        (part / name).unlink()
    assert ckpt.read_header(part / "model-00001-of-00004.safetensors").metadata[ckpt.META_VERSION] == "1"
    assert main(["quantize", str(src), str(part), *ARGS]) == 0
    assert "layers quantized now: 3, resumed from an earlier run: 1" in capsys.readouterr().out
    assert_same_files(part, full)
    assert ckpt.verify_checkpoint(part).version == 2
    reference = AutoModelForCausalLM.from_pretrained(src)
    quantize_(reference, CONFIG, progress=False)
    loaded = load_quantized(part)
    assert_same_model(reference, loaded)
    ids = torch.randint(3, 256, (1, 8), generator=gen)
    assert torch.equal(logits(loaded, ids), logits(reference, ids))


def test_hard_kill_and_resume(tmp_path):
    """A SIGKILLed `milo quantize` process (no cleanup at all) resumes to the same files."""
    src = float_folder(tmp_path / "src", "qwen3_moe")
    out, full = tmp_path / "out", tmp_path / "full"
    command = [sys.executable, "-m", "milo_tensor.cli", "quantize", str(src), str(out), *ARGS]
    # the same thread count as this process (conftest caps it): float reductions may depend on it
    env = {**os.environ, ABORT_ENV: "2:kill", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2)]
    assert main(["quantize", str(src), str(out), *ARGS]) == 0
    assert main(["quantize", str(src), str(full), *ARGS]) == 0
    assert_same_files(out, full)


def test_changed_config_redoes_layers_and_bad_input_is_refused(tmp_path, capsys):
    src = float_folder(tmp_path / "src", "olmoe")
    out = tmp_path / "out"
    fast = ["--quantizer", "rtn", "--iters", "0", "--no-progress"]
    assert main(["quantize", str(src), str(out), *fast, "--rank-policy", "constant", "--rank", "4"]) == 0
    assert main(["quantize", str(src), str(out), *fast, "--rank-policy", "constant", "--rank", "8",
                 "--compensator-dtype", "int8", "--compensator-group-size", "32"]) == 0
    assert "layers quantized now: 3, resumed from an earlier run: 0" in capsys.readouterr().out
    model = load_quantized(out)
    weight = model.model.layers[1].mlp.experts.down_proj
    assert weight.ranks == (8,) * 4 and weight.comp_bits == 8
    # refusals: a quantized source, a missing folder, the source as output
    assert main(["quantize", str(out), str(tmp_path / "again"), *fast]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nowhere"), str(tmp_path / "x"), *fast]) == 2
    assert "not a transformers model folder" in capsys.readouterr().err
    assert main(["quantize", str(src), str(src), *fast]) == 2
    assert "must differ from the source" in capsys.readouterr().err
    # a float compensator lives in the weights' dtype: fp32 fits this float32 model, bf16 does not
    assert main(["quantize", str(src), str(tmp_path / "bf16"), *fast, "--compensator-dtype", "bf16"]) == 2
    assert "--dtype bfloat16" in capsys.readouterr().err
    assert main(["quantize", str(src), str(tmp_path / "fp32"), *fast, "--compensator-dtype", "fp32",
                 "--rank-policy", "constant", "--rank", "8"]) == 0
    assert load_quantized(tmp_path / "fp32").model.layers[0].mlp.experts.down_proj.v.dtype == torch.float32


def test_only_one_layer_is_materialized_at_a_time(tmp_path, monkeypatch):
    """Peak memory stays near one layer: when a layer is quantized, no other layer holds real tensors."""
    import milo_tensor.config as config_module

    src = float_folder(tmp_path / "src", "qwen2_moe", num_hidden_layers=3)
    real_quantize = config_module.quantize_
    seen = []

    def watching_quantize(model, *args, **kwargs):
        real = {n for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta}
        units = {".".join(n.split(".")[:3]) if n.startswith("model.layers.") else "rest" for n in real}
        seen.append(units)
        return real_quantize(model, *args, **kwargs)

    monkeypatch.setattr(config_module, "quantize_", watching_quantize)
    assert main(["quantize", str(src), str(tmp_path / "out"), *ARGS]) == 0
    # one call per unit (3 layers, then embeddings / norm / head), each seeing only its own tensors
    # (non-persistent buffers such as rotary tables are never materialized)
    assert seen == [{"model.layers.0"}, {"model.layers.1"}, {"model.layers.2"}, {"rest"}], seen


def test_resume_redoes_a_layer_whose_source_changed(tmp_path, capsys, gen):
    src = tmp_path / "src"
    model = tiny_moe("olmoe")
    model.save_pretrained(src)
    out = tmp_path / "out"
    fast = ["--quantizer", "rtn", "--iters", "0", "--rank-policy", "constant", "--rank", "4", "--no-progress"]
    assert main(["quantize", str(src), str(out), *fast]) == 0
    capsys.readouterr()
    # same names, shapes and dtypes; different values in layer 1 only
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(1.5)
    model.save_pretrained(src)
    assert main(["quantize", str(src), str(out), *fast]) == 0
    assert "layers quantized now: 1, resumed from an earlier run: 2" in capsys.readouterr().out
    reference = AutoModelForCausalLM.from_pretrained(src)
    quantize_(reference, milo_int3(4, iters=0, quantizer="rtn"), progress=False)
    loaded = load_quantized(out)
    assert_same_model(reference, loaded)
    ids = torch.randint(3, 256, (1, 8), generator=gen)
    assert torch.equal(logits(loaded, ids), logits(reference, ids))


def test_streamed_checkpoint_refuses_a_shard_of_another_run(tmp_path):
    """Streamed shards each list only their own tensors; the index's shard digests tie them together."""
    from milo_tensor import CheckpointError

    fast = ["--quantizer", "rtn", "--iters", "0", "--rank-policy", "constant", "--rank", "4", "--no-progress"]
    outs = []
    for seed in (0, 1):
        src = tmp_path / f"src{seed}"
        tiny_moe("olmoe", seed=seed).save_pretrained(src)
        outs.append(tmp_path / f"out{seed}")
        assert main(["quantize", str(src), str(outs[-1]), *fast]) == 0
    a, b = outs
    shard = "model-00002-of-00003.safetensors"
    (a / shard).write_bytes((b / shard).read_bytes())  # same names, shapes and config; other values
    with pytest.raises(CheckpointError, match=f"{shard}: does not belong to this checkpoint"):
        load_quantized(a)
    with pytest.raises(CheckpointError, match="does not belong"):
        AutoModelForCausalLM.from_pretrained(a)
    index = json.loads((a / "model.safetensors.index.json").read_text())
    del index["metadata"]["milo_shards"][shard]
    (a / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="milo_shards"):
        load_quantized(a)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, capsys):
    import fcntl

    src = float_folder(tmp_path / "src", "olmoe")
    out = tmp_path / "out"
    out.mkdir()
    fast = ["--quantizer", "rtn", "--iters", "0", "--rank-policy", "constant", "--rank", "4", "--no-progress"]
    with open(out / ".milo-quantize.lock", "a+") as held:  # as a running `milo quantize` holds it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["quantize", str(src), str(out), *fast]) == 2
        assert "another `milo quantize` is writing" in capsys.readouterr().err
    assert main(["quantize", str(src), str(out), *fast]) == 0
    assert not (out / ".milo-quantize.lock").exists()
