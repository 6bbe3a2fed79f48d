"""milo_tensor: MiLo 3-bit MoE quantization (arXiv 2504.02658) as a torchao tensor subclass.

    from milo_tensor import quantize_, milo_int3
    quantize_(model, milo_int3(rank_fn=...))
"""

from milo_tensor import ops as _ops  # noqa: F401  (registers the milo:: ops)
from milo_tensor.config import DEFAULT_SKIP, MiLoInt3Config, is_milo_target, milo_int3, milo_target_weights, quantize_
from milo_tensor.quant.rank import (
    ConstantRank,
    DenseSparseRank,
    EnergyRank,
    KurtosisRank,
    WeightInfo,
    get_rank_policy,
)
from milo_tensor.tensor import MiLoInt3Tensor
from milo_tensor.serialization import CheckpointError, load_quantized, save_quantized
from milo_tensor.integrations.hf_quantizer import MiLoHfConfig  # registers the "milo" transformers quantizer
from milo_tensor.integrations.qkv import fuse_qkv
from milo_tensor.integrations.router import fuse_router_topk
from milo_tensor.integrations.shared_experts import fuse_shared_experts

__version__ = "0.1.0"

__all__ = [
    "MiLoInt3Config",
    "MiLoInt3Tensor",
    "milo_int3",
    "quantize_",
    "is_milo_target",
    "milo_target_weights",
    "DEFAULT_SKIP",
    "ConstantRank",
    "DenseSparseRank",
    "KurtosisRank",
    "EnergyRank",
    "WeightInfo",
    "get_rank_policy",
    "CheckpointError",
    "save_quantized",
    "load_quantized",
    "MiLoHfConfig",
    "fuse_qkv",
    "fuse_router_topk",
    "fuse_shared_experts",
]
