"""Load the parts of a SANA pipeline from a diffusers-format folder (``model_index.json``).

Shared by the text-to-image and video-edit pipelines: transformer, DC-AE, text encoder and the
scheduler config, each from its subfolder, with one dtype/device policy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..hub import DEFAULT_MODEL, component_variant, read_json, resolve_model_path

# Schedulers whose config we understand (the class names official SANA folders use).
SUPPORTED_SCHEDULERS = ("DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler", "SCMScheduler")
# model_index.json entry that marks a text encoder referenced from an installed package.
SANAFLOW_TEXT_ENCODER = ["sanaflow", "SentenceTextEncoder"]
SANAFLOW_TEXT_ENCODER_FILE = "sanaflow_text_encoder.json"


@dataclass
class SanaComponents:
    """The loaded parts of a SANA pipeline."""

    transformer: Any  # sanaflow.models.SanaTransformer
    vae: Any  # sanaflow.models.DCAE
    text_encoder: Any  # object with encode(prompts) -> (hidden, mask)
    scheduler_config: dict[str, Any]
    name: str
    root: Path | None = None
    variant: str | None = None  # the weight-file variant some component was read from (None: default weights)


def pick_device(device: str | torch.device | None) -> torch.device:
    """The requested device, or CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The transformer dtype: as requested, else bf16 on CUDA and float32 on CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose from: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def index_entry(index: dict[str, Any], key: str) -> list | None:
    """model_index.json's [library, class] for component `key`; None when absent; CheckpointError when malformed."""
    value = index.get(key)
    if value is None or (isinstance(value, list) and len(value) == 2 and value[0] is None):
        return None  # diffusers writes [null, null] for an absent component
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise CheckpointError(f"model_index.json entry {key!r} should be [library, class] (two strings), "
                              f"got {value!r}")
    return value


def load_text_encoder(root: Path, index: dict[str, Any], device: torch.device, variant: str | None = None) -> Any:
    """The text encoder named by model_index.json: Gemma-2 from the folder (`variant`'s weights where
    it has them), or a packaged MiniLM."""
    from ..models import text_encoders

    entry = index_entry(index, "text_encoder")
    if entry is None:
        raise CheckpointError(f"{root}/model_index.json names no text_encoder")
    if entry == SANAFLOW_TEXT_ENCODER:
        spec = read_json(root / "text_encoder" / SANAFLOW_TEXT_ENCODER_FILE)
        if spec.get("type") != "minilm-package":
            raise CheckpointError(f"unknown packaged text encoder type {spec.get('type')!r}; expected 'minilm-package'")
        length = spec.get("max_length")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise CheckpointError(f"{root / 'text_encoder' / SANAFLOW_TEXT_ENCODER_FILE}: 'max_length' must be a "
                                  f"positive integer (tokens per caption), got {length!r}")
        return text_encoders.SentenceTextEncoder.from_package(max_length=length, device=device)
    library, cls = entry
    if cls.startswith("Gemma"):
        te_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return text_encoders.GemmaTextEncoder.from_pretrained(root, torch_dtype=te_dtype, device=device,
                                                              variant=variant)
    raise CheckpointError(f"unsupported text encoder {library}.{cls} in {root}/model_index.json; expected a Gemma-2 model")


def load_components(
    ref: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    variant: str | None = None,
) -> tuple[SanaComponents, torch.device]:
    """Load transformer, DC-AE, text encoder and scheduler config of a SANA folder / hub repo.

    `variant` ("fp16", "bf16": the official repos' half-size weight files) is read where a component
    has it and the default weights elsewhere; the models are cast to the pipeline's dtypes either way.
    """
    from ..models import DCAE, SanaTransformer

    dev = pick_device(device)
    tdtype = pick_dtype(dtype, dev)
    root = resolve_model_path(ref, variant=variant)  # checks `variant`
    index = read_json(root / "model_index.json")
    read = {s: component_variant(root / s, variant) for s in ("transformer", "vae", "text_encoder")}
    transformer = SanaTransformer.from_pretrained(root, subfolder="transformer", torch_dtype=tdtype, device=dev,
                                                  variant=read["transformer"])
    # The DC-AE stays in float32 on CPU and bf16 on GPU (fp16 overflows in its decoder).
    vae_dtype = torch.float32 if (dev.type == "cpu" or tdtype == torch.float32) else torch.bfloat16
    vae = DCAE.from_pretrained(root, subfolder="vae", torch_dtype=vae_dtype, device=dev, variant=read["vae"])
    text_encoder = load_text_encoder(root, index, dev, read["text_encoder"])
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
    cls = scheduler_config.get("_class_name")
    if cls not in SUPPORTED_SCHEDULERS:
        raise CheckpointError(f"unsupported scheduler {cls!r} in {root}/scheduler; supported: {', '.join(SUPPORTED_SCHEDULERS)}")
    name = str(ref) if ref is not None else DEFAULT_MODEL
    used = variant if variant in read.values() else None
    return SanaComponents(transformer, vae, text_encoder, scheduler_config, name, root, used), dev
