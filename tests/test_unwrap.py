"""unwrap_tensor_subclass: MiLo parameters as plain tensors, the model's output unchanged."""

import pytest
import torch

from milo_tensor import MiLoInt3Tensor, milo_int3, quantize_, unwrap_tensor_subclass
from models import tiny_moe


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_unwrapped_model_is_plain_and_gives_the_same_logits(family, gen):
    model = tiny_moe(family)
    quantize_(model, milo_int3(4, iters=2), progress=False)
    ids = torch.randint(3, 256, (2, 9), generator=gen)
    before = _logits(model, ids)
    n_quantized = sum(isinstance(p, MiLoInt3Tensor) for p in model.parameters())
    assert n_quantized > 0

    unwrap_tensor_subclass(model)
    assert all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in model.parameters())
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, MiLoInt3Tensor)  # rebuilt on access
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, MiLoInt3Tensor)
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)

    unwrap_tensor_subclass(model)  # a second call finds nothing left to unwrap
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)

    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out = compiled(ids).logits
    torch.testing.assert_close(out, before, rtol=1e-4, atol=1e-4)
