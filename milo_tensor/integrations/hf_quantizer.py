"""The "milo" quantization method of transformers: ``from_pretrained`` / ``save_pretrained`` of MiLo models.

Registered on ``import milo_tensor``::

    model = AutoModelForCausalLM.from_pretrained("milo-checkpoint/")   # quantized, ready to run
    model.save_pretrained("again/")                                   # the same checkpoint format

A MiLo checkpoint's config.json carries ``quantization_config = {"quant_method": "milo", ...}``, so
transformers builds the model on the meta device and hands it to :class:`MiLoHfQuantizer`, which

1. validates the whole checkpoint up front (``milo_tensor.serialization.verify_checkpoint``: headers,
   manifest, expected shapes and dtypes, checksums of every tensor) and raises ``CheckpointError``
   before anything loads;
2. lets transformers' loader read every tensor (device_map, dtype casts of float params, threads),
   routing the inner tensors ``P.__milo__.<inner>`` of each quantized parameter ``P`` through a
   ``WeightConverter`` whose ``MiLoDeserialize`` op rebuilds the ``MiLoInt3Tensor`` (the int3 words
   of a format-1 checkpoint repacked, ``milo_tensor.checkpoint.to_current_layout``);
3. checks every quantized parameter arrived, and points quantized experts modules at the "milo"
   experts implementation.

``save_pretrained`` asks the quantizer for the state dict: the same flattened tensors and header
metadata (version, config, parameter attributes, manifest with checksums) that ``save_quantized``
writes, so both writers produce one format and both loaders read either's output. Passing
``quantization_config=MiLoHfConfig(config=milo_int3(...))`` to ``from_pretrained`` of a float
model quantizes it after loading.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from milo_tensor.quant.packing import FORMAT_VERSION
from milo_tensor.checkpoint import (
    CONFIG_NAME,
    INNER_NAMES,
    MILO_SEP,
    CheckpointError,
    CheckpointInfo,
    build_quantized,
    check_format_version,
    manifest_entry,
    shard_metadata,
    tensor_digest,
    verify_checkpoint,
)
from milo_tensor.serialization import (
    config_from_dict,
    config_to_dict,
    experts_implementation_of,
    flatten_state_dict,
    model_milo_config,
    restore_experts_implementation,
)
from milo_tensor.tensor import MiLoInt3Tensor

__all__ = ["MiLoHfConfig", "MiLoHfQuantizer", "attach_hf_quantizer", "QUANT_METHOD"]

QUANT_METHOD = "milo"


class MiLoHfConfig(QuantizationConfigMixin):
    """transformers' view of a MiLo config: ``quantization_config`` in config.json.

    Args:
        milo_config: the MiLo config as a dict (``milo_tensor.serialization.config_to_dict``).
        config: a ``MiLoInt3Config`` (for ``from_pretrained`` of a float model: quantize after loading);
            its dict form is recorded in ``milo_config``.
        format_version: the storage format version of the checkpoint (config.json's; it must match the
            files' headers). A format-1 checkpoint is repacked while it loads, so a loaded model
            holds, and saves, the current FORMAT_VERSION.
    """

    def __init__(self, milo_config: dict | None = None, format_version: int = FORMAT_VERSION, config=None, **kwargs):
        self.quant_method = QUANT_METHOD
        if config is not None and milo_config is None:
            milo_config = config_to_dict(config)
        self.milo_config = milo_config
        self.format_version = format_version
        self._config = config

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "milo_config": self.milo_config, "format_version": self.format_version}

    def __iter__(self):
        yield from self.to_dict().items()

    def milo_int3_config(self):
        """The ``MiLoInt3Config`` to quantize a float model with."""
        if self._config is not None:
            return self._config
        from milo_tensor.config import milo_int3

        return config_from_dict(self.milo_config) if self.milo_config else milo_int3()


_ALIGN = 64


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied to fresh memory if it is a CPU tensor off a 64-byte boundary (a memory-mapped file).

    Kernels pick SIMD paths by alignment; a misaligned copy of a weight can round differently from
    the same weight freshly allocated, and a loaded model should compute exactly what the saved did.
    """
    if t.device.type == "cpu" and t.numel() and t.data_ptr() % _ALIGN:
        return t.clone()
    return t


def _realign_model(model: nn.Module) -> None:
    """Copy float parameters / buffers that sit misaligned in a memory-mapped file (see ``_aligned``)."""
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and not isinstance(p, MiLoInt3Tensor) and _aligned(p.data) is not p.data:
                p.data = p.data.clone()  # keeps the Parameter object (and the ties through it)
        for name, b in module._buffers.items():
            if b is not None and _aligned(b) is not b:
                module._buffers[name] = b.clone()


class MiLoDeserialize(ConversionOps):
    """Rebuild one ``MiLoInt3Tensor`` parameter from its ``P.__milo__.<inner>`` tensors."""

    def __init__(self, hf_quantizer: "MiLoHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo):
        # transformers deep-copies the converter once per parameter; share the quantizer (and the
        # validated checkpoint it holds) instead of copying it each time.
        return type(self)(self.hf_quantizer)

    def convert(self, input_dict, source_patterns=None, model=None, full_layer_name=None, **kwargs):
        info = self.hf_quantizer.checkpoint
        meta = info.params.get(full_layer_name) if info is not None else None
        if meta is None:
            raise CheckpointError(f"{full_layer_name}: inner MiLo tensors for a parameter the checkpoint does not list")
        inner = {}
        for pattern, tensors in input_dict.items():
            name = pattern.rsplit("__milo__.", 1)[-1]
            if len(tensors) != 1:
                raise CheckpointError(f"{full_layer_name}: {len(tensors)} tensors for {name!r}")
            inner[name] = tensors[0]
        device = next(iter(inner.values())).device
        inner = {k: _aligned(t) for k, t in inner.items()}
        value = build_quantized(full_layer_name, meta, inner, device, version=info.version)
        ref = model.get_parameter(full_layer_name) if model is not None else None
        if ref is not None and ref.dtype.is_floating_point and ref.dtype != value.dtype:
            value = value.to(ref.dtype)  # from_pretrained(dtype=...) asked for another float dtype
        return {full_layer_name: nn.Parameter(value, requires_grad=False)}


class MiLoHfQuantizer(HfQuantizer):
    """Loads MiLo checkpoints (validated, then deserialized by transformers' loader); saves them."""

    requires_calibration = False
    quantization_config: MiLoHfConfig

    def __init__(self, quantization_config: MiLoHfConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint: CheckpointInfo | None = None

    # ---- environment

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("MiLo checkpoints cannot be offloaded to disk; use a device_map without 'disk'")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    # ---- loading

    @property
    def serialized_names(self) -> dict[str, list[str]]:
        if not self.pre_quantized or self.checkpoint is None:
            return {}
        leaves = sorted({fqn.rpartition(".")[2] for fqn in self.checkpoint.params})
        return {leaf: [f"{leaf}{MILO_SEP}{name}" for name in INNER_NAMES] for leaf in leaves}

    def get_load_operations(self) -> dict:
        return {"deserialize": MiLoDeserialize}

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model
        if not checkpoint_files:
            raise CheckpointError("a MiLo checkpoint needs its safetensors files; none were found")
        directory = Path(checkpoint_files[0]).parent
        version = check_format_version(directory / CONFIG_NAME, self.quantization_config.format_version)
        info = verify_checkpoint(directory)
        if version != info.version:
            raise CheckpointError(f"{directory / CONFIG_NAME}: quantization_config.format_version is {version}, the "
                                  f"weight files' headers say {info.version} (files of different checkpoints?)")
        state = model.state_dict()
        for fqn, meta in info.params.items():
            ref = state.get(fqn)
            if ref is None:
                raise CheckpointError(f"{info.location.get(fqn + MILO_SEP + 'qdata', directory)}: quantized tensor "
                                      f"{fqn!r} is not a parameter of {type(model).__name__}")
            if tuple(ref.shape) != tuple(meta["shape"]):
                raise CheckpointError(f"{info.location.get(fqn + MILO_SEP + 'qdata', directory)}: tensor {fqn!r} has "
                                      f"shape {meta['shape']}, the model's parameter {list(ref.shape)}")
        self.checkpoint = info
        if info.config and self.quantization_config.milo_config is None:
            self.quantization_config.milo_config = info.config
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            info = self.checkpoint
            missing = [fqn for fqn in info.params if not isinstance(model.get_parameter(fqn), MiLoInt3Tensor)]
            if missing:
                raise CheckpointError(f"{info.directory}: quantized tensors did not load: {missing[:5]}")
            restore_experts_implementation(model, experts_implementation_of(info.config))
            _realign_model(model)
            self.quantization_config.format_version = FORMAT_VERSION  # repacked while loading (format 1)
        else:
            from milo_tensor.config import quantize_

            quantize_(model, self.quantization_config.milo_int3_config(), progress=False)
        # The checkpoint holds the model's own parameter names; never "revert" them on save.
        model._weight_conversions = []
        return model

    # ---- saving

    def get_state_dict_and_metadata(self, model):
        tensors, params, aliases = flatten_state_dict(model)
        seen: set[tuple] = set()
        state = {}
        for name, t in tensors.items():
            t = t.contiguous()
            key = (t.device, t.untyped_storage().data_ptr())
            if key in seen:
                t = t.clone()  # safetensors refuses tensors sharing storage
            seen.add(key)
            state[name] = t
        manifest = {n: manifest_entry(t, tensor_digest(t)) for n, t in state.items()}
        milo_config = model_milo_config(model, params, self.quantization_config._config)
        self.quantization_config.milo_config = milo_config
        model._weight_conversions = []
        return state, shard_metadata(milo_config, params, manifest, aliases)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def attach_hf_quantizer(model: nn.Module, milo_config: dict | None = None) -> None:
    """Mark a quantized transformers model as a MiLo model (so ``save_pretrained`` writes the MiLo format)."""
    if not isinstance(model, PreTrainedModel):
        return
    qc = MiLoHfConfig(milo_config=milo_config)
    model.hf_quantizer = MiLoHfQuantizer(qc, pre_quantized=True)
    model.config.quantization_config = qc
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model._weight_conversions = []
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = True


def _has_milo_weights(model: nn.Module) -> bool:
    return any(isinstance(p, MiLoInt3Tensor) for p in model.parameters())


def _patch_save_pretrained() -> None:
    """``save_pretrained`` of a model quantized in memory (no ``hf_quantizer`` yet) writes the MiLo format."""
    original = PreTrainedModel.save_pretrained
    if getattr(original, "_milo_patched", False):
        return

    @functools.wraps(original)
    def save_pretrained(self, *args, **kwargs):
        if getattr(self, "hf_quantizer", None) is None and _has_milo_weights(self):
            attach_hf_quantizer(self, None)
        return original(self, *args, **kwargs)

    save_pretrained._milo_patched = True
    PreTrainedModel.save_pretrained = save_pretrained


def register() -> None:
    """Register "milo" with transformers' quantizer registry (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MiLoHfConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MiLoHfQuantizer)
    _patch_save_pretrained()


register()
