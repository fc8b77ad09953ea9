"""Build a trainer `Task` from a `TrainConfig`: the network, its loss, the data and the evaluation.

- ``t2i``: a SanaTransformer trained by `FlowMatchingLoss` on latents of a frozen DC-AE and
  features of a frozen text encoder (computed on the fly, or read from a feature cache).
- ``dcae``: a DCAE trained by `DCAELoss` on images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, InputError
from .cache import TextFeatureCache
from .config import TrainConfig, validate
from .data import FolderSource, ShapesSource, scan_folder
from .losses import DCAELoss, FlowMatchingLoss
from .trainer import Task


def images_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def build_text_encoder(cfg: TrainConfig, device: torch.device | str | None = None):
    """The frozen text encoder named by model.text_encoder ('minilm' or a BERT-style folder)."""
    from ..models.text_encoders import SentenceTextEncoder

    if cfg.model.text_encoder == "minilm":
        return SentenceTextEncoder.from_package(max_length=cfg.model.text_max_length, device=device)
    return SentenceTextEncoder.from_pretrained(cfg.model.text_encoder, max_length=cfg.model.text_max_length,
                                               device=device)


def _init_weights(net, folder: str) -> dict[str, torch.Tensor] | None:
    """Load `folder` into `net`: a model folder, or a checkpoint (model/ + ema/); return the EMA weights if any."""
    from ..hub import find_weight_files, load_state_dict_files, resolve_model_path

    path = resolve_model_path(folder)
    if (path / "model").is_dir():
        net.load_weights(load_state_dict_files(find_weight_files(path / "model")), dtype=torch.float32,
                         source=str(path / "model"))
        if (path / "ema").is_dir():
            return load_state_dict_files(find_weight_files(path / "ema"))
        return None
    net.load_weights(load_state_dict_files(find_weight_files(path)), dtype=torch.float32, source=str(path))
    return None


def _scan_data(cfg: TrainConfig) -> list[tuple[Path, str]] | None:
    """The (image, caption) pairs of a folder source, scanned before any model is built (None: shapes).

    A missing or empty folder, or images without captions, then fail in a moment, not after the models load.
    """
    if cfg.data.source != "folder":
        return None
    try:
        return scan_folder(cfg.data.path, cfg.data.caption_ext)
    except InputError as e:
        raise InputError(f"data.path: {e}") from None


def _source(cfg: TrainConfig, multiple: int, pairs: list[tuple[Path, str]] | None = None):
    d = cfg.data
    if d.source == "shapes":
        # With a sample pool the stream delivers chunks of batch_size / reuse fresh samples per step.
        chunk = cfg.train.batch_size // d.reuse if d.pool_size else cfg.train.batch_size
        return ShapesSource(d.resolution, seed=d.seed, batch_size=chunk, category_weights=d.category_weights)
    return FolderSource(d.path, d.resolution, cfg.train.batch_size, seed=d.seed, caption_ext=d.caption_ext,
                        buckets=d.buckets, multiple=multiple,
                        cache_dir=d.cache_dir if cfg.task == "t2i" else None, pairs=pairs)


class T2IPrepare:
    """Loader batch -> {latents, hidden, mask} with the frozen DC-AE and text encoder (moved on first use).

    Text features come from a `TextFeatureCache` on the device (``text_cache`` captions at most;
    0 = encode every batch): the tokenizer alone costs ~15 ms per 256 captions on the host, and
    the shapes captions repeat.
    """

    def __init__(self, vae, text_encoder, text_cache: int = 16384):
        self.vae, self.text_encoder = vae, text_encoder
        self.text_cache_size = text_cache
        self.text_cache: TextFeatureCache | None = None
        self._device: torch.device | None = None

    def _to(self, device: torch.device) -> None:
        if self._device != device:
            # The frozen encoder runs outside the loss's autocast: bf16 on GPU (2-3x faster, the
            # latents' rounding is far below the noise added to them), float32 on CPU.
            self.vae.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
            if device.type == "cuda":
                # The loader's images arrive channels-last (H, W, 3 memory); cuDNN's bf16 convs run
                # NHWC natively, NCHW would add a layout transform around every conv.
                self.vae.to(memory_format=torch.channels_last)
            self.text_encoder.to(device)
            self._device = device
            self.text_cache = (TextFeatureCache(self.text_encoder, device, self.text_cache_size)
                               if self.text_cache_size > 0 else None)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """uint8 images (B, 3, H, W) -> scaled latents (B, C, h, w), float32."""
        self._to(device)
        x = images_to_unit(images.to(device, non_blocking=True))  # (B, 3, H, W)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        z = self.vae.encode(x.to(self.vae.dtype), tiling=False)  # (B, C, h, w)
        return z.float().contiguous() * self.vae.scaling_factor

    def encode_text(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (hidden (B, L, C) float32, mask (B, L) long), as ordinary (not inference) tensors."""
        self._to(device)
        if self.text_cache is not None:
            return self.text_cache.encode(captions)
        hidden, mask = self.text_encoder.encode(captions, device=device, dtype=torch.float32)
        # encode() runs in inference mode; clone so autograd may save these for backward.
        return hidden.clone(), mask.clone()

    def __call__(self, raw: dict, device: torch.device) -> dict:
        if "latents" in raw:
            latents = raw["latents"].to(device).float() * self.vae.scaling_factor
            hidden, mask = raw["hidden"].to(device).float(), raw["mask"].to(device).long()
        else:
            latents = self.encode_images(raw["image"], device)
            hidden, mask = self.encode_text(raw["caption"], device)
        return {"latents": latents, "hidden": hidden, "mask": mask}


def fill_feature_cache(source: FolderSource, prepare: T2IPrepare, device: torch.device, batch: int = 16) -> int:
    """Encode every not-yet-cached image of a folder source (unscaled latents + text features); return how many."""
    from PIL import Image
    from safetensors.torch import save_file

    from ..utils import atomic_path
    from .data import resize_crop

    todo = [i for i in range(len(source)) if not source.cache_path(i).is_file()]
    for start in range(0, len(todo), batch):
        for i in todo[start:start + batch]:
            item = source.items[i]
            with Image.open(item.path) as im:
                image = resize_crop(im, *item.bucket)[None]  # (1, 3, H, W)
            latents = prepare.encode_images(image, device)[0] / prepare.vae.scaling_factor
            hidden, mask = prepare.encode_text([item.caption], device)
            path = source.cache_path(i)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({"latents": latents.cpu().contiguous(), "hidden": hidden[0].cpu().contiguous(),
                           "mask": mask[0].cpu().contiguous()}, str(tmp))
    return len(todo)


def scheduler_config(flow_shift: float) -> dict[str, Any]:
    """The DPMSolverMultistepScheduler config of official SANA folders (flow sigmas, flow prediction)."""
    from ..config import SchedulerSpec
    from ..hub import DIFFUSERS_VERSION

    return {**SchedulerSpec(type="flow-dpm-solver", flow_shift=float(flow_shift)).diffusers_config(),
            "_diffusers_version": DIFFUSERS_VERSION}


def build_t2i(cfg: TrainConfig) -> Task:
    """The text-to-image flow-matching task."""
    from ..models import DCAE, SanaTransformer

    pairs = _scan_data(cfg)
    net = SanaTransformer.from_config(cfg.model.transformer, source="model.transformer")
    init_ema = _init_weights(net, cfg.model.init_from) if cfg.model.init_from else None
    if cfg.model.vae_path:
        vae = DCAE.from_pretrained(cfg.model.vae_path)
    else:
        vae = DCAE.from_config(cfg.model.vae, source="model.vae")
    vae.eval().requires_grad_(False)
    if net.config.in_channels != vae.config.latent_channels:
        raise ConfigError(f"model.transformer.in_channels ({net.config.in_channels}) must equal the DC-AE's "
                          f"latent_channels ({vae.config.latent_channels})")
    text_encoder = build_text_encoder(cfg)
    if net.config.caption_channels != text_encoder.hidden_size:
        raise ConfigError(f"model.transformer.caption_channels ({net.config.caption_channels}) must equal the text "
                          f"encoder's hidden size ({text_encoder.hidden_size})")
    null_hidden, null_mask = text_encoder.encode([""], dtype=torch.float32)
    # FlowLossConfig's fields are FlowMatchingLoss's keyword arguments, one for one
    loss = FlowMatchingLoss(net, null_hidden.clone().cpu(), null_mask.clone().cpu(), **dataclasses.asdict(cfg.flow))
    prepare = T2IPrepare(vae, text_encoder, text_cache=cfg.model.text_cache)
    source = _source(cfg, vae.spatial_compression_ratio * net.config.patch_size, pairs)
    if isinstance(source, FolderSource) and source.cache_dir is not None:
        fill_feature_cache(source, prepare, torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def evaluate(ema_net, step: int, out: Path) -> dict[str, float]:
        from .evaluate import evaluate_t2i_training

        return evaluate_t2i_training(ema_net, vae, text_encoder, cfg, step, out)

    evaluate_fn = evaluate if cfg.data.source == "shapes" else None
    fingerprint = {"task": "t2i", "transformer": net.config.to_dict(), "caption_channels": text_encoder.hidden_size}
    return Task(loss=loss, source=source, prepare=prepare, fingerprint=fingerprint, evaluate=evaluate_fn,
                init_ema=init_ema, extras={"vae": vae, "text_encoder": text_encoder})


def build_dcae(cfg: TrainConfig) -> Task:
    """The DC-AE reconstruction task."""
    from ..models import DCAE

    pairs = _scan_data(cfg)
    net = DCAE.from_config(cfg.model.vae, source="model.vae")
    init_ema = _init_weights(net, cfg.model.init_from) if cfg.model.init_from else None
    d = cfg.dcae
    loss = DCAELoss(net, l1=d.l1, l2=d.l2, freq=d.freq, adv=d.adv, adv_start=d.adv_start, latent_noise=d.latent_noise)
    source = _source(cfg, net.spatial_compression_ratio, pairs)

    def prepare(raw: dict, device: torch.device) -> dict:
        return {"images": images_to_unit(raw["image"].to(device, non_blocking=True))}

    def evaluate(ema_net, step: int, out: Path) -> dict[str, float]:
        from .evaluate import evaluate_dcae_training

        return evaluate_dcae_training(ema_net, cfg, step, out)

    evaluate_fn = evaluate if cfg.data.source == "shapes" else None
    return Task(loss=loss, source=source, prepare=prepare, fingerprint={"task": "dcae", "vae": net.config.to_dict()},
                evaluate=evaluate_fn, init_ema=init_ema)


def build_task(cfg: TrainConfig) -> Task:
    """The task of `cfg` (validated first)."""
    from .trainer import seed_everything

    validate(cfg)
    seed_everything(cfg.seed)  # the same config gives the same initial weights
    return build_t2i(cfg) if cfg.task == "t2i" else build_dcae(cfg)
