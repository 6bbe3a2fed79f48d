"""fuse_qkv: an attention's q, k and v projections as one stacked int3 weight (block-diagonal compensators),
against the same quantized model unfused, in float64; the stacking itself against the weights' own
dequantization."""

import copy
import os
import sys

import pytest
import torch
from models import decode_step, static_cache_decode_logits, tiny_moe
from test_tensor import random_parts

from milo_tensor import MiLoInt3Tensor, fuse_qkv, milo_int3, quantize_
from milo_tensor.integrations.stacking import stack_rows

# families whose attention has a q/k/v trio: plain, biased (Qwen2-MoE), normed per head (Qwen3-MoE) or on the
# whole projection (OLMoE); DeepSeek-V3's latent attention has none
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def _rank(info):
    """Ranks that differ between q, k and v (8, 4, 0) and elsewhere (6)."""
    return {"q_proj": 8, "k_proj": 4, "v_proj": 0}.get(info.fqn.rsplit(".", 2)[-2], 6)


def _tiny(family, seed=0):
    model = tiny_moe(family, seed=seed).double()
    quantize_(model, milo_int3(_rank, iters=2), progress=False)
    return model


def _attentions(model):
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "q_proj")]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    unfused = _tiny(request.param)
    fused = copy.deepcopy(unfused)
    assert fuse_qkv(fused) == [name for name, _ in _attentions(fused)]
    return unfused, fused


def test_stack_rows_is_exact(gen):
    parts = [random_parts(gen, n, 128, (r,), dtype=torch.float64)[0] for n, r in ((128, 5), (64, 3), (64, 0))]
    both = stack_rows(parts)
    assert both.ranks == (8,) and both.shape == (256, 128)
    torch.testing.assert_close(both.dequantize(), torch.cat([p.dequantize() for p in parts]), rtol=0, atol=1e-15)


def test_stack_rows_refuses_mixed_weights(gen):
    a, _ = random_parts(gen, 64, 128, (4,), dtype=torch.float64)
    b, _ = random_parts(gen, 64, 128, (4,), group_size=32, dtype=torch.float64)
    with pytest.raises(ValueError, match="group size"):
        stack_rows([a, b])
    with pytest.raises(ValueError, match="MiLoInt3Tensor"):
        stack_rows([a, torch.randn(64, 128, dtype=torch.float64)])


def test_int3_linear_blocks_declaration(gen):
    """``blocks`` (the compensator's diagonal blocks, which a kernel may read alone) leaves the reference's
    output as it is, and a malformed declaration is refused with what is wrong."""
    parts = [random_parts(gen, n, 128, (r,), dtype=torch.float64)[0] for n, r in ((128, 5), (64, 3), (64, 0))]
    w = stack_rows(parts)
    x = torch.randn(3, 128, generator=gen, dtype=torch.float64)
    args = (x, w.qdata, w.scales, w.zeros, w.ut, w.v, w.group_size, None)
    plain = torch.ops.milo.int3_linear(*args)
    torch.testing.assert_close(torch.ops.milo.int3_linear(*args, [128, 5, 192, 8, 256, 8]), plain, rtol=0, atol=0)
    for bad, match in (([128, 5, 192, 8, 250, 8], "end at"), ([128, 5, 128, 8, 256, 8], "ascend"),
                       ([128, 5, 192], "flattened")):
        with pytest.raises(ValueError, match=match):
            torch.ops.milo.int3_linear(*args, bad)


@pytest.mark.parametrize("tokens", [1, 7])
def test_fused_model_equals_unfused(gen, pair, tokens):
    unfused, fused = pair
    ids = torch.randint(3, unfused.config.vocab_size, (2, tokens), generator=gen)
    with torch.no_grad():
        expected = unfused(ids).logits
        got = fused(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
    name, attention = _attentions(fused)[0]
    sizes = [getattr(attention, p).out_features for p in ("q_proj", "k_proj", "v_proj")]
    assert attention.milo_qkv_qdata.shape[0] == sum(sizes) and attention.milo_qkv_v.shape[1] == unfused.config.hidden_size
    assert attention.milo_qkv_ut.shape == (8 + 4 + 0, sum(sizes))
    nq, nk, nv = sizes
    assert attention._milo_qkv_blocks == [nq, 8, nq + nk, 12, nq + nk + nv, 12]


def _codes(qdata):
    return qdata.data_ptr(), qdata.shape[0]


def test_the_attention_runs_the_stacked_weight_once(gen, pair, monkeypatch):
    """The fused attention calls milo::int3_linear once for q, k and v (not three times), and a projection
    called on its own (another input) runs its own weight. A call is told by its codes' address and rows (q's
    codes are the stack's first rows: the same address)."""
    _, fused = pair
    _, attention = _attentions(fused)[0]
    calls = []
    real = torch.ops.milo.int3_linear

    class Counting:
        def __call__(self, x, qdata, *args):
            calls.append(_codes(qdata))
            return real(x, qdata, *args)

        def __getattr__(self, item):
            return getattr(real, item)

    monkeypatch.setattr(torch.ops.milo, "int3_linear", Counting())
    ids = torch.randint(3, fused.config.vocab_size, (1, 3), generator=gen)
    with torch.no_grad():
        fused(ids)
    for _, attn in _attentions(fused):
        assert calls.count(_codes(attn.milo_qkv_qdata)) == 1
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert _codes(getattr(attn, proj).weight.qdata) not in calls
    calls.clear()
    x = torch.randn(2, fused.config.hidden_size, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        own = attention.k_proj(x)
    assert calls == [_codes(attention.k_proj.weight.qdata)]
    torch.testing.assert_close(own, x @ attention.k_proj.weight.dequantize().T, rtol=1e-9, atol=1e-12)


def test_fused_decode_compiles(gen, pair):
    """A static-cache decode step of the fused model compiled with fullgraph=True (the q/k/v hand-off traced
    away: one graph, no break) equals the unfused model's step compiled the same way, and its eager steps up
    to inductor's own reordering (the same 8e-8 for the unfused model)."""
    unfused, fused = pair
    ids = torch.randint(3, unfused.config.vocab_size, (2, 5), generator=gen)
    eager = static_cache_decode_logits(unfused, ids, decode_step(unfused))
    got = {}
    for name, model in (("unfused", unfused), ("fused", fused)):
        torch._dynamo.reset()
        got[name] = static_cache_decode_logits(model, ids, torch.compile(decode_step(model), fullgraph=True))
    torch.testing.assert_close(got["fused"], got["unfused"], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got["fused"], eager, rtol=1e-5, atol=1e-6)


def _linears_traced(model, ids):
    """How many F.linear and milo::int3_linear calls torch.compile traces in one decode step (fullgraph: a
    break would raise)."""
    from transformers import StaticCache

    count = []
    op = torch.ops.milo.int3_linear
    matmuls = (torch._C._nn.linear, torch.nn.functional.linear, op, op.default)

    def backend(gm, example_inputs):
        count.append(sum(n.op == "call_function" and n.target in matmuls for n in gm.graph.nodes))
        return gm.forward

    cache = StaticCache(config=model.config, max_cache_len=16)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(decode_step(model), backend=backend, fullgraph=True)(ids[:, :1], cache, torch.tensor([0]))
    return count[0]


def test_compiled_step_traces_one_linear_for_qkv(gen, pair):
    """The trace holds the stacked projection in place of the three (2 fewer matmuls per layer), so the
    hand-off did not fall back to the projections' own weights under torch.compile."""
    unfused, fused = pair
    ids = torch.randint(3, unfused.config.vocab_size, (1, 1), generator=gen)
    assert _linears_traced(unfused, ids) - _linears_traced(fused, ids) == 2 * unfused.config.num_hidden_layers


def test_state_dict_unchanged_and_loading_rebuilds(gen, pair):
    unfused, fused = pair
    sd_u, sd_f = unfused.state_dict(), fused.state_dict()
    assert sd_u.keys() == sd_f.keys()
    for key, value in sd_u.items():
        other = sd_f[key]
        if isinstance(value, MiLoInt3Tensor):
            torch.testing.assert_close(other.dequantize(), value.dequantize(), rtol=0, atol=0)
        else:
            torch.testing.assert_close(other, value, rtol=0, atol=0)
    # another model's weights loaded into the fused one: its stacked copies follow
    family = type(unfused).__name__
    other = _tiny({"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                   "Qwen3MoeForCausalLM": "qwen3_moe", "OlmoeForCausalLM": "olmoe"}[family], seed=1)
    target = copy.deepcopy(fused)
    target.load_state_dict(other.state_dict(), assign=True)
    ids = torch.randint(3, unfused.config.vocab_size, (1, 4), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, other(ids).logits, rtol=1e-9, atol=1e-11)


def test_fuse_twice_and_skips():
    model = _tiny("mixtral")
    names = fuse_qkv(model)
    assert fuse_qkv(model) == names and len(names) == model.config.num_hidden_layers
    assert fuse_qkv(_tiny("deepseek_v3")) == []  # latent attention: no q/k/v trio
    plain = tiny_moe("mixtral").double()  # unquantized projections are left alone
    assert fuse_qkv(plain) == [] and not hasattr(plain.model.layers[0].self_attn, "milo_qkv_qdata")


def test_mismatched_projections_are_left_alone(caplog):
    """A q/k/v trio that cannot share one stack (here k quantized with another group size) keeps its own
    projections, and the log says why."""
    model = tiny_moe("mixtral").double()
    quantize_(model, milo_int3(_rank, iters=2), progress=False)
    other = tiny_moe("mixtral").double()
    quantize_(other, milo_int3(_rank, iters=2, group_size=32), progress=False)
    attention = model.model.layers[0].self_attn
    attention.k_proj = other.model.layers[0].self_attn.k_proj
    with caplog.at_level("INFO", logger="milo_tensor.integrations.qkv"):
        names = fuse_qkv(model)
    assert names == ["model.layers.1.self_attn"]
    assert "model.layers.0.self_attn keeps separate projections" in caplog.text and "group size" in caplog.text


def test_wrong_input_dtype_is_refused(gen, pair):
    _, fused = pair
    _, attention = _attentions(fused)[0]
    hidden = torch.randn(1, 3, fused.config.hidden_size, generator=gen, dtype=torch.float32)
    with pytest.raises(ValueError, match="does not match the q/k/v weights"):
        attention(hidden_states=hidden, position_embeddings=None, attention_mask=None)


def test_tensor_parallel_refuses_a_fused_model(pair):
    """A tensor-parallel split would shard the projections and leave the stack whole: refused, before any mesh
    is touched."""
    from milo_tensor.integrations.distributed import apply_tensor_parallel

    _, fused = pair
    with pytest.raises(ValueError, match="fuse_qkv"):
        apply_tensor_parallel(fused, None)


def test_fused_model_saves_and_loads_into_a_fused_model(gen, pair, tmp_path):
    """save_quantized of a fused model writes the projections (not the stack) and loads into an unfused model;
    another model's checkpoint loaded into a fused model computes what that model does (the stack follows)."""
    from milo_tensor import load_quantized, save_quantized

    unfused, fused = pair
    ids = torch.randint(3, unfused.config.vocab_size, (1, 5), generator=gen)
    save_quantized(fused, tmp_path / "fused")
    target = copy.deepcopy(unfused)
    with torch.no_grad():  # scrambled: what it computes after must come from the file
        for p in target.parameters():
            p.qdata.copy_(p.qdata.flip(-1)) if hasattr(p, "qdata") else p.mul_(0.5)
        again = load_quantized(tmp_path / "fused", model=target)
        torch.testing.assert_close(again(ids).logits, unfused(ids).logits, rtol=1e-9, atol=1e-11)
    family = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe",
              "OlmoeForCausalLM": "olmoe"}[type(unfused).__name__]
    other = _tiny(family, seed=1)
    save_quantized(other, tmp_path / "other")
    with torch.no_grad():
        again = load_quantized(tmp_path / "other", model=copy.deepcopy(fused))
        torch.testing.assert_close(again(ids).logits, other(ids).logits, rtol=1e-9, atol=1e-11)


def test_with_the_other_fusions(gen):
    """fuse_qkv beside fuse_shared_experts and fuse_router_topk on one Qwen2-MoE model (biased q/k/v, a gated
    shared expert, a top-k router): the same logits as the unfused model, eager and compiled (fullgraph)."""
    from milo_tensor import fuse_router_topk, fuse_shared_experts

    unfused = _tiny("qwen2_moe")
    fused = copy.deepcopy(unfused)
    assert len(fuse_qkv(fused)) == len(fuse_shared_experts(fused)) == fused.config.num_hidden_layers
    assert fuse_router_topk(fused) == fused.config.num_hidden_layers
    ids = torch.randint(3, unfused.config.vocab_size, (2, 3), generator=gen)
    with torch.no_grad():
        expected = unfused(ids).logits
        torch.testing.assert_close(fused(ids).logits, expected, rtol=1e-9, atol=1e-11)
        torch._dynamo.reset()
        # compiled: inductor reorders float64 sums (8e-8 for the unfused model too, test_fused_decode_compiles)
        torch.testing.assert_close(torch.compile(fused, fullgraph=True)(ids).logits, expected, rtol=1e-5, atol=1e-6)


def test_projections_are_views_of_the_stack(pair):
    """After fuse_qkv each projection's codes, scales, zeros and V are its rows of the stack (the same memory),
    so fusing adds only the stack's block-diagonal U (and a stacked bias); its own U stays its own. Memory as
    bench_decode.py reports it (distinct storages)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from bench_decode import weight_bytes

    unfused, fused = pair
    added = 0
    for _, attention in _attentions(fused):
        mods = [getattr(attention, p) for p in ("q_proj", "k_proj", "v_proj")]
        n0 = r0 = 0
        for m in mods:
            w = m.weight
            n, r = w.shape[0], w.v.shape[0]
            for inner, first in (("qdata", n0), ("scales", n0), ("zeros", n0), ("v", r0)):
                stack = getattr(attention, f"milo_qkv_{inner}")
                own = getattr(w, inner)
                assert own.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr(), inner
                assert own.data_ptr() == stack[first:].data_ptr() and own.shape[1:] == stack.shape[1:]
            assert w.ut.untyped_storage().data_ptr() != attention.milo_qkv_ut.untyped_storage().data_ptr()
            n0, r0 = n0 + n, r0 + r
        added += attention.milo_qkv_ut.untyped_storage().nbytes()
        if attention.milo_qkv_bias is not None:
            added += attention.milo_qkv_bias.untyped_storage().nbytes()
    assert weight_bytes(fused) - weight_bytes(unfused) == added


def test_fused_model_save_pretrained_round_trips(gen, pair, tmp_path):
    """save_pretrained of a fused model (its projections' codes, scales, zeros and V are slices of one storage
    each) loads with from_pretrained into the unfused model's logits."""
    from transformers import AutoModelForCausalLM

    unfused, fused = pair
    fused.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, unfused.config.vocab_size, (1, 5), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, unfused(ids).logits, rtol=1e-9, atol=1e-11)
