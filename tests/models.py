"""Tiny random-initialised MoE models of several transformers 5 families, built from configs."""

import torch
import transformers as T

_COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)

FAMILIES = {
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128),
    ),
    "qwen3_moe": (
        T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16),
    ),
    "deepseek_v3": (
        T.DeepseekV3Config, T.DeepseekV3ForCausalLM,
        dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1,
             first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=64, qk_rope_head_dim=16,
             qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1, num_key_value_heads=4),
    ),
    "olmoe": (T.OlmoeConfig, T.OlmoeForCausalLM, dict(num_experts=4, num_experts_per_tok=2)),
}


def tiny_moe(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**(_COMMON | extra | overrides))
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Heavier-tailed weights than the default init, like trained LLM weights.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(1 + 2 * torch.rand_like(p).pow(8))
    return model


def static_cache_decode_logits(
    model: torch.nn.Module, ids: torch.Tensor, step_fn, steps: int = 4, cache=None
) -> torch.Tensor:
    """Logits of `steps` greedy decode steps after the prompt `ids`, each through
    step_fn(tok, cache, position), on `cache` after its reset() or on a fresh static KV cache: the
    eager and the compiled decode loop of a test run the same steps on the same cache layout. (A loop
    compiled with inductor freezing must be given the same cache object every time: freezing binds
    the graph to the tensors of the cache it was compiled with.)"""
    from transformers import StaticCache

    prompt, dev = ids.shape[1], ids.device
    if cache is None:
        cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 16)
    else:
        cache.reset()
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(prompt, device=dev))
        tok = out.logits[:, -1:].argmax(-1)
        logits = []
        for i in range(steps):
            lg = step_fn(tok, cache, torch.tensor([prompt + i], device=dev))
            logits.append(lg.double().clone())
            tok = lg[:, -1:].argmax(-1)
    return torch.cat(logits, 1)


def decode_step(model: torch.nn.Module):
    """One decode step of `model` as step_fn for static_cache_decode_logits (what the tests compile)."""

    def step(tok, cache, pos):
        return model(tok, past_key_values=cache, use_cache=True, cache_position=pos).logits

    return step
