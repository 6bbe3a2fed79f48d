"""One module instance's forward replaced by a fused one (fuse_router_topk, fuse_shared_experts, fuse_qkv)."""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["swap_forward"]


def swap_forward(module: nn.Module, forward: Callable, prefix: str) -> None:
    """Give ``module`` a subclass of its class (named ``prefix`` + the class's name) whose forward is
    ``forward``; the original class stays reachable as ``_milo_unfused_cls``, for the fused forward's
    fall-backs. Only this instance changes: its parameters, buffers and state dict stay as they are, and
    isinstance checks against the model's own class still hold."""
    cls = type(module)
    module.__class__ = type(f"{prefix}{cls.__name__}", (cls,), {"forward": forward, "_milo_unfused_cls": cls})
