"""quantize_ on tiny MoE models of several transformers families."""

import copy

import pytest
import torch
from torchao.quantization import FqnToConfig
from torchao.quantization import quantize_ as torchao_quantize_

import milo_tensor
from milo_tensor import ConstantRank, DenseSparseRank, MiLoInt3Tensor, is_milo_target, milo_int3, quantize_
from models import FAMILIES, decode_step, static_cache_decode_logits, tiny_moe

FAST = dict(iters=4)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantize_family(family, gen):
    model = tiny_moe(family)
    ids = torch.randint(3, 256, (2, 12), generator=gen)
    ref = _logits(model, ids)
    rtn = copy.deepcopy(model)
    quantize_(rtn, milo_int3(0, quantizer="rtn", iters=0), progress=False)
    quantize_(model, milo_int3(DenseSparseRank(dense_rank=16, sparse_rank=8), **FAST), progress=False)

    quantized = {n for n, p in model.named_parameters() if isinstance(p, MiLoInt3Tensor)}
    for name, p in model.named_parameters():
        targeted = (name.endswith(("gate_up_proj", "down_proj")) and p.ndim == 3) or (
            p.ndim == 2 and "proj" in name and "lm_head" not in name and "shared_expert_gate" not in name
        )
        if targeted:
            assert name in quantized, name
    assert not any(n.startswith("lm_head") or ".gate." in n + "." for n in quantized)
    assert model.config._experts_implementation == "milo"
    expert_stacks = [p for n, p in model.named_parameters() if n.endswith("experts.gate_up_proj")]
    assert expert_stacks and all(p.ranks == (8,) * p.shape[0] for p in expert_stacks)

    out = _logits(model, ids)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < _rel(_logits(rtn, ids), ref)
    generated = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)


def test_eager_experts_loop_equals_milo_path(gen):
    model = tiny_moe("mixtral")
    quantize_(model, milo_int3(4, **FAST), progress=False)
    ids = torch.randint(3, 256, (2, 10), generator=gen)
    grouped = _logits(model, ids)
    model.set_experts_implementation("eager")
    torch.testing.assert_close(_logits(model, ids), grouped, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_moe_model(gen):
    model = tiny_moe("qwen3_moe")
    quantize_(model, milo_int3(4, **FAST), progress=False)
    ids = torch.randint(3, 256, (1, 8), generator=gen)
    eager = _logits(model, ids)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out = compiled(ids).logits.double()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_compile_with_freezing(gen):
    """torch._inductor.config.freezing (recommended for compiled decode in docs/benchmarks.md: the MiLo
    weights become graph constants, no per-call subclass handling) keeps the logits, with a quantized
    (8-bit) compensator too."""
    import torch._inductor.config as inductor_config

    model = tiny_moe("mixtral")
    quantize_(model, milo_int3(4, compensator_bits=8, compensator_group_size=32, **FAST), progress=False)
    ids = torch.randint(3, 256, (1, 8), generator=gen)
    eager = _logits(model, ids)
    with inductor_config.patch(freezing=True), torch.no_grad():
        out = torch.compile(model, fullgraph=True)(ids).logits.double()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_frozen_compiled_decode_loop_follows_the_kv_cache(gen):
    """A static-cache decode loop compiled with freezing equals eager step by step, for two prompts on
    one cache reset in between (README's usage): freezing turns the weights into constants but must
    not freeze what the KV cache holds. (It does bind the graph to that cache's tensors: a second
    StaticCache object would be read as the first one, torch 2.11 and 2.13, bf16 and fp32.)"""
    import torch._inductor.config as inductor_config
    from transformers import StaticCache

    model = tiny_moe("mixtral")
    quantize_(model, milo_int3(4, **FAST), progress=False)
    step = decode_step(model)
    cache = StaticCache(config=model.config, max_cache_len=32)
    with inductor_config.patch(freezing=True):
        compiled = torch.compile(step, fullgraph=True)
        for _ in range(2):
            ids = torch.randint(3, 256, (2, 6), generator=gen)
            eager = static_cache_decode_logits(model, ids, step)
            frozen = static_cache_decode_logits(model, ids, compiled, cache=cache)
            torch.testing.assert_close(frozen, eager, rtol=1e-4, atol=1e-4)


def test_torchao_quantize_with_filter_and_fqn_to_config(gen):
    a, b = tiny_moe("mixtral"), tiny_moe("mixtral")
    config = milo_int3(ConstantRank(4), **FAST)
    torchao_quantize_(a, config, filter_fn=is_milo_target)
    assert isinstance(a.model.layers[0].mlp.experts.gate_up_proj, MiLoInt3Tensor)
    assert isinstance(a.model.layers[0].self_attn.q_proj.weight, MiLoInt3Tensor)
    # FqnToConfig: experts only, attention left in float
    quantize_(b, FqnToConfig({r"re:.*experts\.(gate_up_proj|down_proj)": config}), progress=False)
    assert isinstance(b.model.layers[1].mlp.experts.down_proj, MiLoInt3Tensor)
    assert not isinstance(b.model.layers[0].self_attn.q_proj.weight, MiLoInt3Tensor)
    ids = torch.randint(3, 256, (1, 6), generator=gen)
    assert torch.isfinite(_logits(b, ids)).all()


def test_rank_fn_sees_names_kinds_and_experts():
    seen = []

    def rank_fn(info):
        seen.append((info.fqn, info.kind, info.expert, info.shape))
        assert info.weight.shape == info.shape
        return 8 if info.kind == "dense" else info.expert

    model = tiny_moe("qwen2_moe")
    quantize_(model, milo_int3(rank_fn, **FAST), progress=False)
    stack = model.model.layers[0].mlp.experts.gate_up_proj
    assert stack.ranks == (0, 1, 2, 3)
    assert ("model.layers.0.mlp.experts.gate_up_proj", "expert", 2, (128, 64)) in seen
    assert ("model.layers.1.self_attn.q_proj.weight", "dense", None, (64, 64)) in seen
    assert ("model.layers.0.mlp.shared_expert.down_proj.weight", "dense", None, (64, 128)) in seen


def test_refusals_name_the_module():
    model = tiny_moe("deepseek_v3", q_lora_rank=32)  # q_b_proj has K=32, not a multiple of 64
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_b_proj"):
        quantize_(model, milo_int3(4, **FAST), progress=False)
    model = tiny_moe("mixtral")
    with pytest.raises(ValueError, match="larger|exceeds|min"):
        quantize_(model, milo_int3(1000, **FAST), progress=False)
    with pytest.raises(ValueError, match="rank policy|valid"):
        milo_int3("no-such-policy")
    with pytest.raises(ValueError, match="group_size"):
        milo_int3(group_size=48)


def test_transposed_biased_experts_are_refused():
    import transformers as T

    config = T.GptOssConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention"],
    )
    model = T.GptOssForCausalLM(config)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts .*(transposed|biases)"):
        quantize_(model, milo_int3(4, **FAST), progress=False)


def test_package_exports():
    for name in ("milo_int3", "MiLoInt3Config", "MiLoInt3Tensor", "quantize_", "ConstantRank", "KurtosisRank"):
        assert hasattr(milo_tensor, name)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_milo_target_weights_names_what_quantize_replaces(family):
    model = tiny_moe(family)
    targets = milo_tensor.milo_target_weights(model)
    quantize_(model, milo_int3(0, iters=0), progress=False)
    assert sorted(targets) == sorted(n for n, p in model.named_parameters() if isinstance(p, MiLoInt3Tensor))
    assert milo_tensor.milo_target_weights(model) == []  # nothing left to quantize


def test_requantizing_warns_and_changes_nothing(gen):
    model = tiny_moe("mixtral")
    quantize_(model, milo_int3(4, **FAST), progress=False)
    ids = torch.randint(3, 256, (1, 8), generator=gen)
    before = _logits(model, ids)
    with pytest.warns(UserWarning, match="no weight to quantize"):
        quantize_(model, milo_int3(8, **FAST), progress=True)
    assert torch.equal(_logits(model, ids), before)
    assert all(p.ranks == (4,) * len(p.ranks) for p in model.parameters() if isinstance(p, MiLoInt3Tensor))
