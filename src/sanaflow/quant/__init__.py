"""Quantization of the SANA transformer: INT8 weight-only (CPU and GPU) and FP8 (Hopper GPUs).

``quantize_transformer(model, mode)`` swaps every ``nn.Linear`` and pointwise ``nn.Conv2d`` of the
transformer blocks (self- and cross-attention projections, Mix-FFN's 1x1 convs: >95% of the
FLOPs) for a quantized layer (`sanaflow.quant.layers`), except the modules named in
`HIGH_PRECISION_MODULES`. A quantized model is saved as a normal model folder whose safetensors
hold int8 / float8 weights with float32 per-channel scales and whose ``config.json`` carries a
``_sanaflow_quantization`` entry (mode, layers, version); ``SanaTransformer.from_pretrained`` sees
the entry and rebuilds the quantized layers before loading (`load_quantized`).

Why not torchao's tensor subclasses: its ``quantize_`` only swaps ``nn.Linear`` (missing the 1x1
convs that hold ~55% of a block's FLOPs), its subclasses need a torchao-specific format to go
through safetensors, and its releases are tied to torch versions. The layers here are plain
modules: FP8 is the same recipe as torchao's float8 dynamic activation + weight with per-row
scales (``torch._scaled_mm``, fast accumulation); INT8 is per-channel symmetric weight-only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, InputError, check_choice
from ..hub import (
    CONFIG_NAME,
    QUANTIZATION_KEY,
    ModelMixin,
    find_weight_files,
    load_state_dict_files,
    read_json,
)
from ..utils import atomic_path
from .layers import LAYER_CLASSES, Fp8Linear, Int8WeightOnlyLinear, is_pointwise_conv

QUANT_MODES = ("int8", "fp8")
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Modules (by name prefix in SanaTransformer / diffusers' SanaTransformer2DModel) that stay in the
# model dtype. Defined once; every quantization mode honours it. Besides these, only Linear and
# 1x1 Conv2d layers are ever quantized, so norms, the depthwise 3x3 convs, scale_shift_tables and
# position tables are never touched.
HIGH_PRECISION_MODULES = (
    "patch_embed",  # first layer (conv patchify of the latents): errors here reach every block
    "time_embed",  # timestep (+ guidance) embedding and the adaLN modulation shared by all blocks
    "caption_projection",  # caption MLP: runs on 300 tokens, cheap, and feeds every cross-attention
    "caption_norm",
    "norm_out",
    "proj_out",  # final projection to latent channels: its error goes straight into the velocity
)

__all__ = [
    "HIGH_PRECISION_MODULES",
    "QUANT_MODES",
    "check_mode",
    "copy_pipeline_with_quantized_transformer",
    "Fp8Linear",
    "Int8WeightOnlyLinear",
    "fp8_supported",
    "is_quantized",
    "load_quantized",
    "quantizable_modules",
    "quantize_transformer",
    "save_quantized",
]


def fp8_supported(device: torch.device | str | None = None) -> bool:
    """True when `device` (default: the current CUDA device) has FP8 tensor cores (sm_89+, e.g. H100)."""
    if not torch.cuda.is_available():
        return False
    device = torch.device("cuda") if device is None else torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_mode(mode: str) -> None:
    """Raise a ConfigError naming the valid modes unless `mode` is one of them (a string)."""
    check_choice("quantization mode", mode, QUANT_MODES)


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise InputError(f"quantization needs a torch.nn.Module (e.g. a SanaTransformer), got {type(model).__name__}")


def check_quantization(mode: str, device: torch.device | str) -> None:
    """Raise unless `mode` is a quantization mode that runs on `device` (fp8 needs FP8 tensor cores)."""
    check_mode(mode)
    device = torch.device(device)
    if mode == "fp8" and not fp8_supported(device):
        where = "a CPU" if device.type != "cuda" else f"{torch.cuda.get_device_name(device)} (compute capability < 8.9)"
        raise InputError(
            f"fp8 quantization needs a CUDA GPU with FP8 tensor cores (H100/H200, L40S, RTX 40xx), but the model is on "
            f"{where}; use such a GPU, or quantize to int8 (runs on CPU and any GPU)"
        )


def _keep_high_precision(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in HIGH_PRECISION_MODULES)


def quantizable_modules(model: nn.Module, mode: str) -> list[str]:
    """Names of the layers `quantize_transformer` replaces in `model` for `mode`."""
    _check_model(model)
    check_mode(mode)
    names = []
    for name, module in model.named_modules():
        if _keep_high_precision(name) or not (isinstance(module, nn.Linear) or is_pointwise_conv(module)):
            continue
        out_features, in_features = module.weight.shape[:2]
        if mode == "fp8" and (in_features % 16 or out_features % 16):
            continue  # the fp8 matmul needs both sizes divisible by 16 (true for every official config)
        names.append(name)
    return names


def is_quantized(model: nn.Module) -> str | None:
    """The quantization mode of `model` ("int8" / "fp8"), or None for a float model."""
    for module in model.modules():
        if isinstance(module, (Int8WeightOnlyLinear, Fp8Linear)):
            return module.mode
    return None


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    if param is None:
        raise InputError(f"{type(model).__name__} has no parameters: there is nothing to quantize")
    return param.device


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent.register_module(child, new)


def quantize_transformer(model: nn.Module, mode: str) -> nn.Module:
    """Quantize `model`'s Linear / 1x1-conv layers in place ("int8" weight-only, or "fp8" on sm_89+ GPUs)."""
    _check_model(model)
    check_mode(mode)
    if (current := is_quantized(model)) is not None:
        raise ConfigError(f"this model is already quantized ({current}); load the float model to quantize again")
    check_quantization(mode, _device_of(model))
    cls = LAYER_CLASSES[mode]
    with torch.no_grad():
        for name in quantizable_modules(model, mode):
            _replace(model, name, cls.from_float(model.get_submodule(name)))
    return model


def _quantization_entry(model: nn.Module) -> dict[str, Any]:
    mode = is_quantized(model)
    if mode is None:
        raise ConfigError("save_quantized needs a quantized model; call quantize_transformer(model, mode) first")
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, (Int8WeightOnlyLinear, Fp8Linear)):
            layers[name] = "pointwise_conv" if module.pointwise_conv else "linear"
    float_dtypes = {p.dtype for n, p in model.named_parameters() if p.is_floating_point()}
    dtype = str(next(iter(float_dtypes))).removeprefix("torch.") if len(float_dtypes) == 1 else "float32"
    return {"mode": mode, "version": FORMAT_VERSION, "dtype": dtype, "layers": layers}


def save_quantized(model: ModelMixin, path: str | os.PathLike) -> Path:
    """Write a quantized model folder: config.json (with the quantization entry) and safetensors weights."""
    entry = _quantization_entry(model)
    folder = Path(path)
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp, max_shard_size=None)
        config = json.loads((tmp / CONFIG_NAME).read_text(encoding="utf-8"))
        config[QUANTIZATION_KEY] = entry
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


LAYER_KINDS = ("linear", "pointwise_conv")  # the `layers` values of the quantization entry


def _float_layer(model: nn.Module, name: str, kind: object, folder: Path) -> nn.Linear | nn.Conv2d:
    """The float layer `name` of `model` that the entry says is quantized as `kind`; CheckpointError if it is not one."""
    if not isinstance(kind, str) or kind not in LAYER_KINDS:
        raise CheckpointError(f"{folder}: quantized layer {name!r} has kind {kind!r}; "
                              f"expected one of {', '.join(LAYER_KINDS)}")
    try:
        old = model.get_submodule(name) if name else None
    except AttributeError:
        old = None
    if old is None:
        raise CheckpointError(f"{folder}: quantized layer {name!r} does not exist in {type(model).__name__}")
    fits = isinstance(old, nn.Linear) if kind == "linear" else is_pointwise_conv(old)
    if not fits:
        what = "an nn.Linear" if kind == "linear" else "a 1x1 nn.Conv2d (stride 1, no padding, ungrouped)"
        raise CheckpointError(f"{folder}: quantized layer {name!r} is marked {kind!r}, but in "
                              f"{type(model).__name__} it is {type(old).__name__}, not {what}")
    return old


def load_quantized(
    cls: type[ModelMixin],
    folder: str | os.PathLike,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> ModelMixin:
    """Load a folder written by `save_quantized` (``SanaTransformer.from_pretrained`` calls this for you)."""
    from ..hub import check_load_arguments

    # The checks of `ModelMixin.from_pretrained` (which calls this), for direct calls.
    torch_dtype, device = check_load_arguments(torch_dtype, device)
    folder = Path(folder)
    raw = read_json(folder / CONFIG_NAME)
    entry = raw.get(QUANTIZATION_KEY)
    if not isinstance(entry, dict) or entry.get("mode") not in QUANT_MODES or not isinstance(entry.get("layers"), dict):
        raise CheckpointError(f"{folder / CONFIG_NAME}: malformed {QUANTIZATION_KEY!r} entry: {entry!r}")
    if entry.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: quantized format version {entry.get('version')!r} is not supported "
                              f"(this sanaflow reads version {FORMAT_VERSION}); re-run `sanaflow quantize`")
    mode = entry["mode"]
    if mode == "fp8" and device is not None and not fp8_supported(device):
        raise InputError(f"{folder} holds an fp8-quantized model, which runs only on CUDA GPUs with FP8 tensor "
                         f"cores (sm_89+); got device {device}")
    config = cls.validate_config(raw, source=str(folder / CONFIG_NAME))
    saved_dtype = _DTYPES.get(entry.get("dtype"))
    if saved_dtype is None:
        raise CheckpointError(f"{folder}: quantization entry has dtype {entry.get('dtype')!r}; "
                              f"expected one of {', '.join(_DTYPES)}")
    dtype = torch_dtype or saved_dtype
    layer_cls = LAYER_CLASSES[mode]
    with torch.device("meta"):
        model = cls(**config)
        for name, kind in entry["layers"].items():
            old = _float_layer(model, name, kind, folder)
            out_features, in_features = old.weight.shape[:2]
            _replace(model, name, layer_cls(in_features, out_features, old.bias is not None, kind == "pointwise_conv",
                                            bias_dtype=dtype))
    state = load_state_dict_files(find_weight_files(folder))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match the quantized {cls.__name__}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    cast = {}
    quantized_keys = {f"{n}.{s}" for n in entry["layers"] for s in ("weight", "weight_scale")}
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{folder}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
        if key in quantized_keys:
            if tensor.dtype != expected[key].dtype:
                raise CheckpointError(f"{folder}: {key} is {tensor.dtype}, expected {expected[key].dtype} for {mode}")
            cast[key] = tensor
        else:
            cast[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    model.load_state_dict(cast, strict=True, assign=True)
    model._init_computed_buffers()
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise CheckpointError(f"{folder}: weights left tensors uninitialised: {leftovers[:5]}")
    if device is not None:
        model.to(device)
    return model.eval()


def copy_pipeline_with_quantized_transformer(src: Path, out: Path, model: ModelMixin) -> Path:
    """Copy a pipeline folder (model_index.json layout) to `out`, its transformer/ replaced by `model`."""
    if not (src / "model_index.json").is_file():
        raise CheckpointError(f"{src} is not a pipeline folder (no model_index.json)")
    with atomic_path(out) as tmp:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("transformer"))
        save_quantized(model, tmp / "transformer")
    return out
