"""Plain-tensor parameters for a compiled inference loop.

A compiled step that takes tensor-subclass parameters pays for them on every call in torch 2.11:
the runtime flattens each subclass into its inner tensors and a Python guard checks its metadata,
per weight (most of a compiled MiLo decode step's host time, docs/kernel.md). Registering each
MiLoInt3Tensor parameter as its plain inner tensors plus a parametrization that rebuilds the
subclass on access (torchao's ``UnwrapTensorSubclass``, which torchao applies to Linear and
Embedding weights only) moves that rebuild into the traced graph, so compiled calls see plain
tensors. The parametrized model is for inference: its state dict names the inner tensors
(``parametrizations.<name>.original<i>``), so save the quantized model before unwrapping.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize
from torchao.utils import UnwrapTensorSubclass

from milo_tensor.tensor import MiLoInt3Tensor


def unwrap_tensor_subclass(model: torch.nn.Module) -> torch.nn.Module:
    """Parametrize every MiLoInt3Tensor parameter of ``model`` (Linear weights and 3D expert
    stacks alike) as plain tensors, in place; returns ``model``. Idempotent."""
    targets = [
        (module, name)
        for module in model.modules()
        for name, param in module.named_parameters(recurse=False)
        if isinstance(param, MiLoInt3Tensor)
    ]
    for module, name in targets:
        parametrize.register_parametrization(module, name, UnwrapTensorSubclass())
    return model
