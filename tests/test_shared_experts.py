"""fuse_shared_experts: a MoE layer's shared-expert MLP cut into expert-shaped pieces that ride in the
experts' grouped launches, against the same quantized layer unfused, in float64."""

import copy

import pytest
import torch
import transformers as T
from models import _COMMON, tiny_moe
from test_tensor import random_parts

from milo_tensor import fuse_shared_experts, load_quantized, milo_int3, quantize_, save_quantized


def _rank(info):
    """Ranks that differ between the routed experts (2 or 6) and the shared MLP (8): the stacks get padded."""
    return 8 if info.kind == "dense" else (2, 6)[info.expert % 2]


def _tiny(family):
    if family == "deepseek_v2":  # two shared experts: one MLP of twice the experts' width, two pieces
        cfg = T.DeepseekV2Config(**(_COMMON | dict(
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=2,
            first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16,
            v_head_dim=16, n_group=1, topk_group=1, num_key_value_heads=4)))
        torch.manual_seed(0)
        model = T.DeepseekV2ForCausalLM(cfg).eval()
    else:
        model = tiny_moe(family)
    model = model.double()
    quantize_(model, milo_int3(_rank, iters=2), progress=False)
    return model


def _moe_block(model):
    return next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts"))


FAMILIES = ["deepseek_v2", "deepseek_v3", "qwen2_moe"]  # 2 plain pieces, 1 plain piece, 2 sigmoid-gated pieces


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    unfused = _tiny(request.param)
    fused = copy.deepcopy(unfused)
    assert fuse_shared_experts(fused, max_tokens=5) == [name for name, m in fused.named_modules()
                                                        if hasattr(m, "experts")]
    return request.param, unfused, fused


@pytest.mark.parametrize("tokens", [1, 5, 9])  # pieces in the launch up to max_tokens=5, the MLP itself past it
def test_fused_layer_equals_unfused(gen, pair, tokens):
    family, unfused, fused = pair
    x = torch.randn(1, tokens, unfused.config.hidden_size, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        expected = _moe_block(unfused)(x)
        got = _moe_block(fused)(x)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)
    experts, routed = _moe_block(fused).experts, _moe_block(unfused).experts.gate_up_proj.shape[0]
    pieces = {"deepseek_v2": 2, "deepseek_v3": 1, "qwen2_moe": 2}[family]
    assert experts.gate_up_proj.shape[0] == experts.down_proj.shape[0] == routed + pieces


def test_other_experts_implementations_run_the_mlp(gen, pair):
    """Under another experts implementation (transformers' eager loop over the routed experts) the fused
    layer's MLP computes itself."""
    _, unfused, fused = pair
    x = torch.randn(1, 3, unfused.config.hidden_size, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        expected = _moe_block(unfused)(x)
        fused.set_experts_implementation("eager")
        try:
            got = _moe_block(fused)(x)
        finally:
            fused.set_experts_implementation("milo")
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_fused_model_logits_and_compile(gen, pair):
    _, unfused, fused = pair
    ids = torch.randint(3, 256, (2, 2), generator=gen)  # 4 tokens: the pieces path
    with torch.no_grad():
        expected = unfused(ids).logits
        torch.testing.assert_close(fused(ids).logits, expected, rtol=1e-8, atol=1e-9)
        block = _moe_block(fused)
        x = torch.randn(1, 3, unfused.config.hidden_size, generator=gen, dtype=torch.float64)
        compiled = torch.compile(block, fullgraph=True)
        # DeepSeek's router scores in float32, which inductor's kernels round differently
        torch.testing.assert_close(compiled(x), _moe_block(unfused)(x), rtol=1e-6, atol=1e-9)


def test_fused_model_saves_like_the_unfused_one(gen, pair, tmp_path):
    """The state dict keeps the unfused layout (the pieces dropped, the routed experts' own padding), so a
    checkpoint of the fused model loads into a fresh model; loading into a fused model is refused."""
    _, unfused, fused = pair
    want, got = unfused.state_dict(), fused.state_dict()
    assert want.keys() == got.keys()
    for k, v in want.items():
        assert type(got[k]) is type(v) and got[k].shape == v.shape, k
        if hasattr(v, "dequantize") and v.ndim == 3:
            assert got[k].ut.shape == v.ut.shape and got[k].ranks == v.ranks, k
        torch.testing.assert_close(got[k].dequantize() if hasattr(v, "dequantize") else got[k],
                                   v.dequantize() if hasattr(v, "dequantize") else v, rtol=0, atol=0)
    save_quantized(fused, tmp_path / "ckpt")
    target = copy.deepcopy(unfused)  # its weights scrambled: what it computes after must come from the file
    with torch.no_grad():
        for p in target.parameters():
            p.qdata.copy_(p.qdata.flip(-1)) if hasattr(p, "qdata") else p.mul_(0.5)
    again = load_quantized(tmp_path / "ckpt", model=target)
    ids = torch.randint(3, 256, (1, 5), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, unfused(ids).logits, rtol=1e-8, atol=1e-9)
    with pytest.raises(RuntimeError, match="load the checkpoint into the unfused model, then fuse"):
        fused.load_state_dict(unfused.state_dict())
    stacks = {n: p.qdata.clone() for n, p in fused.named_parameters() if hasattr(p, "qdata")}
    with pytest.raises(RuntimeError, match=r"mlp\.experts: its shared experts are fused.*then fuse"):
        load_quantized(tmp_path / "ckpt", model=fused)  # refused before any parameter is replaced
    assert all(torch.equal(p.qdata, stacks[n]) for n, p in fused.named_parameters() if hasattr(p, "qdata"))


def test_default_token_bound(gen):
    """Without max_tokens, batches whose rows keep every expert (pieces included) at 4 on average."""
    model = _tiny("deepseek_v2")
    fuse_shared_experts(model)
    shared = _moe_block(model).experts.milo_shared
    assert (shared.count, shared.routed, shared.max_tokens) == (2, 4, 4 * (4 + 2) // (2 + 2))
    assert fuse_shared_experts(model) == []  # already fused


def test_refusals():
    model = _tiny("deepseek_v3")
    mlp = _moe_block(model).shared_experts
    float_model = copy.deepcopy(model)
    _moe_block(float_model).shared_experts.gate_proj.weight = torch.nn.Parameter(
        torch.zeros(64, 64, dtype=torch.float64), requires_grad=False)
    with pytest.raises(ValueError, match="gate_proj is not quantized"):
        fuse_shared_experts(float_model)
    odd = copy.deepcopy(model)
    shared = _moe_block(odd).shared_experts
    for name in ("gate_proj", "up_proj"):
        w = getattr(shared, name).weight
        getattr(shared, name).weight = torch.nn.Parameter(w.narrow(0, 0, 32), requires_grad=False)
    with pytest.raises(ValueError, match="not a multiple of the routed experts' 64"):
        fuse_shared_experts(odd)
    assert type(mlp).__name__ == "DeepseekV3MLP"  # a refused layer is left as it was


def test_expert_parallel_refuses_a_fused_model():
    from milo_tensor.integrations.distributed import apply_expert_parallel

    model = _tiny("deepseek_v3")
    fuse_shared_experts(model)
    with pytest.raises(ValueError, match="fuse_shared_experts.*split the unfused model instead"):
        apply_expert_parallel(model, ep_mesh=None)


def test_sharded_model_is_refused(tmp_path):
    """A shared MLP already split by tensor parallelism (its weights DTensors): fusing is refused, not skipped."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    model = _tiny("deepseek_v3")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        lin = _moe_block(model).shared_experts.up_proj
        lin.weight = torch.nn.Parameter(distribute_tensor(torch.zeros(64, 64, dtype=torch.float64), mesh, [Replicate()]),
                                        requires_grad=False)
        with pytest.raises(ValueError, match=r"sharded \(DTensor\); fuse_shared_experts runs on an unsharded model"):
            fuse_shared_experts(model)
    finally:
        dist.destroy_process_group()
