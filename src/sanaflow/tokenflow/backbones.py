"""The Backbone protocol TokenFlow is written against, and its Stable Diffusion implementation.

A backbone gives the editor: frame encode/decode, text embedding (and the token ids behind it), one
denoiser call on a batch of frames, its self-attention sites (with the arithmetic of one attention,
`AttentionOps`), its cross-attention sites (with `CrossAttentionOps`, for Prompt-to-Prompt control),
the sites that take PnP attention and feature injection, and its scheduler as two functions: `timesteps`
(the model-call times of a sampling run, noisiest first) and `move` (deterministic transport of a
latent from one time to another given the model output: a DDIM step or a flow-ODE Euler step; the
same function runs forward for sampling and backward for inversion). Hook sites are named once, here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from .attention import AttentionOps, TokenFlowAttnProcessor, TokenFlowState
from .cross_attention import CrossAttentionControl, CrossAttentionOps
from .injection import FeatureInjectionHook

CANNY_THRESHOLDS = (100, 200)  # TokenFlow's announced ControlNet setting
TOKENFLOW_NEGATIVE = "ugly, blurry, low res, unrealistic, unaesthetic"  # TokenFlow's default (for SD)
# SANA's default fraction of steps with Prompt-to-Prompt cross-attention control: on the embedded
# model, PnP alone often binds an edited attribute to the wrong object; keeping the source's
# cross-attention maps for the first half of the steps fixes much of it (see cross_attention.py).
SANA_CROSS_ATTENTION = 0.5
# SANA's default factor of the edited words' cross-attention probabilities while the control runs
# (Prompt-to-Prompt re-weighting; 1 = off): on the embedded model the source caption's other words
# outvote an edited colour; 4 was the most accurate of 1 / 2 / 4 on the 8 validation videos
# (edit accuracy 0.50 / 0.59 / 0.61, colour edits 0.52 / 0.70 / 0.73; BENCHMARKS.md, issue 6).
SANA_CROSS_REWEIGHT = 4.0
# SANA's default local-blend threshold (`blend.py`): only where the two prompts' velocities differ by
# at least half of a frame's largest difference is the video edited; elsewhere it stays the source.
SANA_LOCAL_BLEND = 0.5
# SANA's default weight of propagated keyframe tokens against each frame's own (PnP-injected) attention
# output (1: TokenFlow's pure propagation, 0: frames edited alone). On the 8 validation videos 0.7 beat
# pure propagation on edit accuracy (0.54 vs 0.44), structure IoU and warp error at once; lower weights
# gained little accuracy and lost temporal consistency (BENCHMARKS.md issue 6, session 17).
SANA_PROPAGATION = 0.7
# SANA's default output propagation (`EditSettings.output_propagation`): weight and fraction of leading
# steps. Inside the edit each frame's prediction is its keyframes' (warped by DIS flow) in the first half of
# the steps, where an edited object's colour is decided; its own afterwards. On the 8 validation videos
# it cut the warp error by 30 % (0.00124 -> 0.00087) for 0.035 of edit accuracy; the whole schedule
# (weight 1) blurs the objects away (BENCHMARKS.md issue 6, session 18).
SANA_OUTPUT_PROPAGATION = (1.0, 0.5)


@dataclass
class TextCond:
    """Embedded prompts: hidden states (P, L, D) and an optional attention mask (P, L)."""

    hidden: torch.Tensor
    mask: torch.Tensor | None = None

    def take(self, index: Sequence[int]) -> TextCond:
        """The embeddings of prompts `index` (one row per batch element)."""
        idx = torch.as_tensor(list(index), device=self.hidden.device)
        return TextCond(self.hidden[idx], None if self.mask is None else self.mask[idx])


class Backbone(Protocol):
    """What TokenFlow needs from a text-to-image model (see the module docstring)."""

    name: str  # identity of the weights, part of the inversion cache key
    multiple: int  # frame sides must be multiples of this (VAE factor x patch size)
    device: torch.device
    dtype: torch.dtype
    attention_ops: AttentionOps
    processor_class: type[TokenFlowAttnProcessor]  # the processor type its attention modules accept
    cross_attention_ops: CrossAttentionOps
    cross_processor_class: type[CrossAttentionControl]  # the same, for its cross-attention modules
    supports_control: bool
    # Sampling defaults of the model family, used when an edit names none: SD is sampled at CFG 7.5
    # with TokenFlow's negative prompt; SANA at CFG 4.5 with the empty prompt it was trained to
    # treat as unconditional (any other text is out of distribution for its unconditional branch).
    default_guidance: float
    default_negative: str
    # Fraction of leading steps with Prompt-to-Prompt cross-attention control when an edit names none.
    default_cross_attention: float
    # Factor of the edited words' cross-attention probabilities while the control runs (1: off).
    default_cross_reweight: float
    # Local-blend threshold when an edit names none (0: off).
    default_local_blend: float
    # Weight of propagated tokens against each frame's own attention when an edit names none (1: pure propagation).
    default_propagation: float
    # Weight of the keyframes' carried predictions inside the edit when an edit names none (0: off).
    default_output_propagation: float
    # ... and the fraction of leading steps it runs in.
    default_output_propagation_steps: float

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, h, w)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> frames (B, 3, H, W) in [-1, 1]."""

    def embed(self, prompts: Sequence[str]) -> TextCond:
        """Text embeddings of `prompts`."""

    def token_ids(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids (P, L) behind `embed`'s positions and the mask (P, L) it carries (None: no mask)."""

    def denoise(
        self, x: torch.Tensor, t: float, cond: TextCond, control: torch.Tensor | None = None,
        control_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One denoiser call on latents x (B, C, h, w) at time t; returns the raw model output."""

    def control_images(self, frames: np.ndarray) -> torch.Tensor:
        """Per-frame control images (T, 3, H, W) for the extra conditioning (Canny edges)."""

    def self_attention_processors(self) -> dict[str, Any]:
        """The current processors of every self-attention site, by site name."""

    def set_self_attention_processors(self, processors: dict[str, Any]) -> None:
        """Replace the processors of the named self-attention sites."""

    def cross_attention_processors(self) -> dict[str, Any]:
        """The current processors of every cross-attention site, by site name."""

    def set_cross_attention_processors(self, processors: dict[str, Any]) -> None:
        """Replace the processors of the named cross-attention sites."""

    def pnp_attention_sites(self) -> list[str]:
        """Self-attention sites that take PnP query/key injection."""

    def feature_modules(self) -> dict[str, torch.nn.Module]:
        """Modules whose output takes PnP feature injection, by site name."""

    def timesteps(self, steps: int) -> list[float]:
        """Model-call times of a `steps`-step sampling run, noisiest first."""

    def move(self, x: torch.Tensor, out: torch.Tensor, t_from: float | None, t_to: float | None) -> torch.Tensor:
        """Transport x from time t_from to t_to given the model output (None = the clean end)."""

    def inversion_time(self, t_from: float | None, t_to: float) -> float:
        """The time at which inversion calls the model to move from t_from to t_to."""


@contextlib.contextmanager
def tokenflow_hooks(backbone: Backbone, state: TokenFlowState) -> Iterator[None]:
    """Install TokenFlow's self- and cross-attention processors and PnP feature hooks reading `state`; restore on exit."""
    original = backbone.self_attention_processors()
    pnp = set(backbone.pnp_attention_sites())
    processors = {
        site: backbone.processor_class(site, state, backbone.attention_ops, proc, pnp=site in pnp)
        for site, proc in original.items()
    }
    original_cross = backbone.cross_attention_processors()
    cross = {
        site: backbone.cross_processor_class(site, state, backbone.cross_attention_ops, proc)
        for site, proc in original_cross.items()
    }
    hook = FeatureInjectionHook(state)
    handles = [m.register_forward_hook(hook) for m in backbone.feature_modules().values()]
    backbone.set_self_attention_processors(processors)
    backbone.set_cross_attention_processors(cross)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        backbone.set_cross_attention_processors(original_cross)
        backbone.set_self_attention_processors(original)


def model_identity(root: Path, variant: str | None = None) -> str:
    """The folder plus a fingerprint of its files (names, sizes, times), so retrained weights miss the cache.

    A weight `variant` read (fp16 / bf16 files) is part of it: other weights, other inversions.
    """
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return f"{Path(root).resolve()}#{h.hexdigest()[:16]}" + (f"@{variant}" if variant else "")


def canny_edges(frames: np.ndarray, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]) -> np.ndarray:
    """Canny edge maps of frames (T, H, W, 3) uint8 -> (T, H, W, 3) uint8 (white edges on black)."""
    import cv2

    edges = [cv2.Canny(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), low, high) for f in frames]
    return np.repeat(np.stack(edges)[..., None], 3, axis=-1)


# --------------------------------------------------------------------------------------------
# Stable Diffusion (diffusers)
# --------------------------------------------------------------------------------------------


class SDAttentionOps:
    """Softmax attention with the projections of a diffusers `Attention` module."""

    def project(self, attn, x):
        """q, k, v (B, h, N, d) of x (B, N, D)."""
        b, n, _ = x.shape
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (B, N, inner)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, n, attn.heads, d).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        return q, k, v

    def attend(self, attn, q, k, v):
        """Attention of q over k, v."""
        return F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (B, h, Nq, d)

    def output(self, attn, o, x):
        """Output projection (B, h, N, d) -> (B, N, D)."""
        return _sd_output(attn, o, x)


def _sd_output(attn, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A diffusers `Attention`'s output: projection of o (B, h, N, d), residual, rescale -> (B, N, D)."""
    b, h, n, d = o.shape
    out = attn.to_out[1](attn.to_out[0](o.transpose(1, 2).reshape(b, n, h * d)))  # (B, N, D)
    if attn.residual_connection:
        out = out + x
    return out / attn.rescale_output_factor


class SDCrossAttentionOps:
    """Softmax cross-attention of a diffusers `Attention` module (``attn2``), as its default processor runs it."""

    def project(self, attn, x, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        """q (B, h, N, d), k, v (B, h, L, d) and the additive mask (B, h, 1|N, L) or None."""
        if x.ndim != 3 or attn.spatial_norm is not None:
            raise RuntimeError("cross-attention control needs token inputs (B, N, D) and no spatial norm "
                               f"(got {x.ndim}-D input, spatial_norm={attn.spatial_norm is not None})")
        context = x if encoder_hidden_states is None else encoder_hidden_states  # (B, L, C)
        b, length = context.shape[:2]
        bias = None
        if attention_mask is not None:
            # diffusers' convention: one row per (batch, head), then split into (B, h, 1|N, L)
            bias = attn.prepare_attention_mask(attention_mask, length, b)
            bias = bias.view(b, attn.heads, -1, bias.shape[-1])
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)  # (B, N|L, inner)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))  # (B, h, N|L, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        return q, k, v, bias

    def scale(self, attn, q):
        """The module's softmax scale (1 / sqrt(d) for SD)."""
        return attn.scale

    def output(self, attn, o, x):
        """Output projection (B, h, N, d) -> (B, N, D), with the module's residual and rescale settings."""
        return _sd_output(attn, o, x)


class StableDiffusionBackbone:
    """SD 1.5 / 2.x through diffusers: UNet2DConditionModel, AutoencoderKL, CLIP, DDIM (+ ControlNet)."""

    # TokenFlow's PnP sites, named once: the residual branch of the second ResNet of the second decoder
    # block, and every decoder self-attention except the first (SD: up_blocks[1] attentions 1-2 and
    # up_blocks[2], [3] attentions 0-2).
    FEATURE_SITE = "up_blocks.1.resnets.1.conv2"
    SELF_ATTENTION = ".attn1"
    CROSS_ATTENTION = ".attn2"

    supports_control = True
    default_guidance = 7.5
    default_negative = TOKENFLOW_NEGATIVE
    default_cross_attention = 0.0  # TokenFlow's published setting on SD has no cross-attention control
    default_cross_reweight = 1.0
    default_local_blend = 0.0  # nor local blending
    default_propagation = 1.0  # and propagates keyframe tokens alone
    default_output_propagation = 0.0  # not the denoiser's output
    default_output_propagation_steps = 1.0
    processor_class = TokenFlowAttnProcessor
    cross_processor_class = CrossAttentionControl

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, controlnet=None, name: str = "sd"):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = scheduler
        self.controlnet = controlnet
        self.name = name
        self._compiled_unet = None  # set by `compile`
        self._hooked = False  # TokenFlow processors installed (the compiled UNet is then bypassed)
        self.device = unet.device
        self.dtype = unet.dtype
        self.attention_ops = SDAttentionOps()
        self.cross_attention_ops = SDCrossAttentionOps()
        self.multiple = sd_frame_multiple(vae.config)
        self.scaling_factor = vae.config.scaling_factor
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"unsupported prediction_type {self.prediction_type!r}; expected epsilon, v_prediction or sample")
        self.alphas_cumprod = scheduler.alphas_cumprod.double()  # (num_train_timesteps,)
        self.final_alpha = float(scheduler.final_alpha_cumprod)
        names = [n for n, _ in unet.named_modules()]
        if self.FEATURE_SITE not in names:
            raise CheckpointError(f"this UNet has no {self.FEATURE_SITE!r} (TokenFlow's feature-injection site)")

    @classmethod
    def from_pretrained(
        cls,
        ref: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        controlnet: str | os.PathLike | None = None,
        variant: str | None = None,
    ) -> StableDiffusionBackbone:
        """Load from a diffusers SD folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/).

        `variant` ("fp16", ...) reads those weight files where a component has them (SD repos ship fp16 ones).
        """
        if importlib.util.find_spec("diffusers") is None:
            raise ConfigError("Stable Diffusion backbones need diffusers: pip install 'sanaflow[sd]'")
        from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from ..hub import component_variant, resolve_model_path

        root = resolve_model_path(ref, variant=variant)  # checks `variant`
        device = torch.device(device)
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (root / s).is_dir()]
        if missing:
            raise CheckpointError(f"{root} is not a Stable Diffusion folder: missing {', '.join(missing)}")
        variants = {s: component_variant(root / s, variant) for s in ("unet", "vae", "text_encoder")}
        try:
            unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype,
                                                        variant=variants["unet"])
            # The VAE stays in float32: SD's VAE overflows in float16 (black or NaN frames).
            vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32,
                                                variant=variants["vae"])
            text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype,
                                                         variant=variants["text_encoder"])
            tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
            scheduler = DDIMScheduler.from_pretrained(root, subfolder="scheduler")
            cnet = None
            if controlnet is not None:
                cnet_root = resolve_model_path(controlnet, variant=variant)
                cnet = ControlNetModel.from_pretrained(cnet_root, torch_dtype=dtype,
                                                       variant=component_variant(cnet_root, variant)).to(device)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load Stable Diffusion from {root}: {e}") from e
        for m in (unet, vae, text_encoder):
            m.to(device).eval().requires_grad_(False)
        return cls(unet, vae, text_encoder, tokenizer, scheduler, controlnet=cnet,
                   name=model_identity(root, variant if variant in variants.values() else None))

    # frames <-> latents -------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, frames):
        """Frames (B, 3, H, W) in [-1, 1] -> scaled latents."""
        posterior = self.vae.encode(frames.to(self.device, torch.float32)).latent_dist
        return (posterior.mean * self.scaling_factor).to(self.dtype)  # (B, 4, H/8, W/8)

    @torch.no_grad()
    def decode(self, latents):
        """Scaled latents -> frames (B, 3, H, W) in [-1, 1]."""
        return self.vae.decode(latents.to(self.device, torch.float32) / self.scaling_factor).sample

    @torch.no_grad()
    def embed(self, prompts):
        """Text embeddings of `prompts`."""
        ids, _ = self.token_ids(prompts)
        return TextCond(self.text_encoder(ids.to(self.device))[0])  # (P, 77, D)

    def token_ids(self, prompts):
        """CLIP ids (P, 77) padded to the tokenizer's length; no mask (SD attends to the padding too)."""
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids  # (P, 77)
        return ids, None

    def control_images(self, frames):
        """Per-frame control images (T, 3, H, W) in [0, 1]."""
        edges = torch.from_numpy(canny_edges(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W)
        return edges.float() / 255.0

    # the denoiser -------------------------------------------------------------------------

    @torch.no_grad()
    def denoise(self, x, t, cond, control=None, control_scale=None):
        """One model call on latents x (B, C, h, w) at time t; control rows are weighted by `control_scale`."""
        x = x.to(self.device, self.dtype)
        # Uploaded without a host sync (torch.tensor(t, device=...) waits for the stream); a tensor
        # rather than a number also keeps a compiled UNet from specialising on every timestep.
        timestep = torch.tensor(t).to(self.device, non_blocking=True)
        hidden = cond.hidden.to(self.device, self.dtype)
        extra = {}
        if control is not None:
            if self.controlnet is None:
                raise ConfigError("control images were given but no ControlNet is loaded")
            scale = control_scale.to(self.device, self.dtype)  # (B,)
            rows = scale.nonzero().flatten()  # the ControlNet runs only where it has weight
            if len(rows):
                down, mid = self.controlnet(
                    x[rows], timestep, encoder_hidden_states=hidden[rows],
                    controlnet_cond=control[rows.cpu()].to(self.device, self.dtype), return_dict=False,
                )
                w = scale[rows].view(-1, 1, 1, 1)  # (b, 1, 1, 1)

                def full(r: torch.Tensor) -> torch.Tensor:
                    return r.new_zeros((x.shape[0], *r.shape[1:])).index_copy_(0, rows, r * w)  # (B, ...)

                extra = {
                    "down_block_additional_residuals": [full(r) for r in down],
                    "mid_block_additional_residual": full(mid),
                }
        unet = self.unet if self._compiled_unet is None or self._hooked else self._compiled_unet
        return unet(x, timestep, encoder_hidden_states=hidden, return_dict=False, **extra)[0]

    def compile(self, **options) -> None:
        """torch.compile the UNet for the plain passes (inversion, reconstruction); TokenFlow passes stay eager.

        The TokenFlow processors regroup tokens by Python state every call, which a compiled graph
        would have to re-trace; the plain passes are the bulk of the default (500-step) setting.
        """
        self._compiled_unet = torch.compile(self.unet, **options)

    def self_attention_processors(self):
        """The processors of every self-attention site, by site name."""
        return self._processors_ending(self.SELF_ATTENTION)

    def set_self_attention_processors(self, processors):
        """Replace the processors of the named self-attention sites."""
        self._set_processors(processors)

    def cross_attention_processors(self):
        """The processors of every cross-attention site, by site name."""
        return self._processors_ending(self.CROSS_ATTENTION)

    def _processors_ending(self, suffix):
        # attn_processors is keyed "<module>.processor"; sites are the module names.
        return {
            name.removesuffix(".processor"): proc
            for name, proc in self.unet.attn_processors.items()
            if name.removesuffix(".processor").endswith(suffix)
        }

    def set_cross_attention_processors(self, processors):
        """Replace the processors of the named cross-attention sites."""
        self._set_processors(processors)

    def _set_processors(self, processors):
        # diffusers' set_attn_processor wants every processor of the UNet, keyed "<module>.processor".
        current = dict(self.unet.attn_processors)
        current.update({f"{site}.processor": proc for site, proc in processors.items()})
        self._hooked = any(isinstance(p, (TokenFlowAttnProcessor, CrossAttentionControl)) for p in current.values())
        self.unet.set_attn_processor(current)  # (empties `current`: diffusers pops what it assigns)

    def pnp_attention_sites(self):
        """Self-attention sites that take PnP query/key injection."""
        decoder = [s for s in self.self_attention_processors() if s.startswith("up_blocks.")]
        return decoder[1:]

    def feature_modules(self):
        """The module whose output takes PnP feature injection, by site name."""
        return {self.FEATURE_SITE: self.unet.get_submodule(self.FEATURE_SITE)}

    # the scheduler ------------------------------------------------------------------------

    def timesteps(self, steps):
        """Model-call times of a `steps`-step sampling run, noisiest first."""
        self.scheduler.set_timesteps(steps)
        return [int(t) for t in self.scheduler.timesteps]

    def _alpha(self, t):
        return self.final_alpha if t is None or t < 0 else float(self.alphas_cumprod[int(t)])

    def move(self, x, out, t_from, t_to):
        """DDIM (eta 0) from t_from to t_to: x0 and noise from the model output, then re-noise."""
        a_from, a_to = self._alpha(t_from), self._alpha(t_to)
        x, out = x.float(), out.float()
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
        elif self.prediction_type == "v_prediction":
            x0 = math.sqrt(a_from) * x - math.sqrt(1 - a_from) * out
            eps = math.sqrt(a_from) * out + math.sqrt(1 - a_from) * x
        else:
            x0 = out
            eps = (x - math.sqrt(a_from) * x0) / math.sqrt(1 - a_from)
        return math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps

    def inversion_time(self, t_from, t_to):
        """The time inversion evaluates the model at, moving from t_from to t_to."""
        # DDIM inversion evaluates the noise at the target time (the usual approximation).
        return t_to


# --------------------------------------------------------------------------------------------
# Loading by reference
# --------------------------------------------------------------------------------------------


def load_backbone(
    ref: str | os.PathLike | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    controlnet: str | os.PathLike | None = None,
    variant: str | None = None,
) -> Backbone:
    """Load the backbone a model folder holds: SD (has unet/) or SANA (has transformer/).

    `variant` ("fp16", "bf16") reads those weight files where a component has them.
    """
    from ..hub import resolve_model_path

    root: Path = resolve_model_path(ref, variant=variant)  # checks `variant`
    if (root / "unet").is_dir():
        return StableDiffusionBackbone.from_pretrained(root, device=device, dtype=dtype, controlnet=controlnet,
                                                       variant=variant)
    if (root / "transformer").is_dir():
        if controlnet is not None:
            raise ConfigError("--controlnet is only available with Stable Diffusion models")
        return SanaBackbone.from_pretrained(root, device=device, dtype=dtype, variant=variant)
    raise CheckpointError(
        f"{root} is neither a Stable Diffusion folder (unet/) nor a SANA folder (transformer/) in diffusers layout"
    )


def sd_frame_multiple(vae_config: Mapping[str, Any]) -> int:
    """Frame sides of a Stable Diffusion backbone are multiples of this: the VAE halves them per extra block."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def sana_frame_multiple(vae_config: Mapping[str, Any], transformer_config: Mapping[str, Any]) -> int:
    """Frame sides of a SANA backbone are multiples of this: DC-AE's compression times the patch size."""
    return 2 ** (len(vae_config["encoder_block_out_channels"]) - 1) * int(transformer_config["patch_size"])


def frame_multiple(ref: str | os.PathLike | None) -> int | None:
    """The `multiple` of the backbone `load_backbone(ref)` builds, read from its config files (no weights).

    Lets a frame size be judged before the model loads. None when the folder is not one `load_backbone`
    takes or its configs lack the fields (loading then says what is wrong).
    """
    from ..hub import read_json, resolve_model_path

    root: Path = resolve_model_path(ref)
    try:
        if (root / "unet").is_dir():
            return sd_frame_multiple(read_json(root / "vae" / "config.json"))
        if (root / "transformer").is_dir():
            return sana_frame_multiple(read_json(root / "vae" / "config.json"),
                                       read_json(root / "transformer" / "config.json"))
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None
    return None


# --------------------------------------------------------------------------------------------
# SANA (our linear DiT + DC-AE + text encoder, flow matching)
# --------------------------------------------------------------------------------------------


class SanaAttentionOps:
    """ReLU linear attention with the projections of a `SanaSelfAttention`.

    Attending to the concatenation of several frames' keys sums their k^T v summaries, so the
    joint keyframe attention costs O(K N d^2) instead of softmax's O((K N)^2 d).
    """

    def project(self, attn, x):
        """q, k, v (B, h, N, d) of x (B, N, D)."""
        return attn.project_qkv(x)  # (B, h, N, d) each, ReLU applied by the kernel

    def attend(self, attn, q, k, v):
        """Attention of q over k, v."""
        from ..ops.linear_attention import linear_attention

        return linear_attention(q, k, v)  # (B, h, Nq, d)

    def output(self, attn, o, x):
        """Output projection (B, h, N, d) -> (B, N, D)."""
        return attn.project_out(o.transpose(1, 2).flatten(2))  # (B, N, D)


class SanaCrossAttentionOps:
    """Softmax cross-attention with the projections of a `SanaCrossAttention` (as `SoftmaxCrossAttnProcessor`)."""

    def project(self, attn, x, encoder_hidden_states, attention_bias):
        """q (B, h, N, d), k, v (B, h, L, d) and the caption bias (B, 1, 1, L) or None."""
        q = attn.project_q(x)  # (B, h, N, d)
        k, v = attn.project_kv(encoder_hidden_states)  # (B, h, L, d) each
        return q, k, v, attention_bias

    def scale(self, attn, q):
        """1 / sqrt(d), the default of scaled_dot_product_attention that SANA uses."""
        return q.shape[-1] ** -0.5

    def output(self, attn, o, x):
        """Output projection (B, h, N, d) -> (B, N, D)."""
        return attn.project_out(o.transpose(1, 2).flatten(2))  # (B, N, D)


def _sana_processor_class() -> type[TokenFlowAttnProcessor]:
    from ..models.sana_transformer import SelfAttnProcessor

    # SanaTransformer accepts only SelfAttnProcessor instances on its self-attention modules.
    return type("SanaTokenFlowAttnProcessor", (TokenFlowAttnProcessor, SelfAttnProcessor), {})


def _sana_cross_processor_class() -> type[CrossAttentionControl]:
    from ..models.sana_transformer import CrossAttnProcessor

    # ... and only CrossAttnProcessor instances on its cross-attention modules.
    return type("SanaCrossAttentionControl", (CrossAttentionControl, CrossAttnProcessor), {})


class SanaBackbone:
    """SANA: `SanaTransformer` (velocity), `DCAE` latents, a text encoder, flow-ODE Euler steps.

    Times are flow sigmas in [0, 1] (0 = clean); the transformer gets sigma x 1000 x timestep_scale.
    PnP sites: the Mix-FFN output of the middle block and the self-attention of the later half of the
    blocks, playing the roles of SD's decoder ResNet and decoder attentions.
    """

    supports_control = False
    default_guidance = 4.5  # SANA's own default (configs/generate/generate.yaml)
    default_negative = ""
    default_local_blend = SANA_LOCAL_BLEND
    default_cross_reweight = SANA_CROSS_REWEIGHT
    default_propagation = SANA_PROPAGATION
    default_output_propagation, default_output_propagation_steps = SANA_OUTPUT_PROPAGATION

    def __init__(self, transformer, vae, text_encoder, scheduler_config: dict, name: str = "sana"):
        from ..models.text_encoders import TokenizingTextEncoder

        if transformer.config.guidance_embeds:
            raise ConfigError("guidance-distilled (SANA-Sprint) models cannot edit videos; use a flow-matching SANA model")
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.scheduler_config = dict(scheduler_config)
        self.name = name
        self.device = next(transformer.parameters()).device
        self.dtype = next(transformer.parameters()).dtype
        self.attention_ops = SanaAttentionOps()
        self.processor_class = _sana_processor_class()
        self.cross_attention_ops = SanaCrossAttentionOps()
        self.cross_processor_class = _sana_cross_processor_class()
        # The control aligns the prompts' tokens: an encoder that gives no token ids (precomputed or
        # stand-in embeddings) cannot take it, so it is off by default there (and refused if asked for).
        tokenizes = isinstance(text_encoder, TokenizingTextEncoder)
        self.default_cross_attention = SANA_CROSS_ATTENTION if tokenizes else 0.0
        self.multiple = sana_frame_multiple(vae.config, transformer.config)
        self.scaling_factor = vae.scaling_factor
        layers = len(transformer.transformer_blocks)
        self.feature_site = f"transformer_blocks.{layers // 2}.ff"
        self.pnp_sites = [f"transformer_blocks.{i}.attn1" for i in range(layers // 2, layers)]

    @classmethod
    def from_pretrained(cls, ref, device="cpu", dtype=None, variant: str | None = None) -> SanaBackbone:
        """Load a SANA folder in diffusers layout (transformer/, vae/, text_encoder/, scheduler/).

        `variant` ("fp16", "bf16") reads those weight files where a component has them.
        """
        from ..pipelines.components import load_components

        parts, _ = load_components(ref, device=device, dtype=dtype, variant=variant)
        name = model_identity(parts.root, parts.variant) if parts.root is not None else parts.name
        return cls(parts.transformer, parts.vae, parts.text_encoder, parts.scheduler_config, name=name)

    @torch.no_grad()
    def encode(self, frames):
        """Frames (B, 3, H, W) in [-1, 1] -> scaled latents."""
        z = self.vae.encode(frames.to(self.device, self.vae.dtype))  # (B, C, H/f, W/f)
        return (z * self.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode(self, latents):
        """Scaled latents -> frames (B, 3, H, W) in [-1, 1]."""
        return self.vae.decode(latents.to(self.device, self.vae.dtype) / self.scaling_factor).float()

    @torch.no_grad()
    def embed(self, prompts):
        """Text embeddings of `prompts`."""
        hidden, mask = self.text_encoder.encode(list(prompts), device=self.device)
        return TextCond(hidden, mask)  # (P, L, C), (P, L)

    def token_ids(self, prompts):
        """The ids (P, L) and mask (P, L) of the caption positions `embed` returns (after any token selection)."""
        from ..models.text_encoders import TokenizingTextEncoder

        if not isinstance(self.text_encoder, TokenizingTextEncoder):
            raise ConfigError(
                f"the text encoder ({type(self.text_encoder).__name__}) gives no token ids, which cross-attention "
                "control needs to align the prompts; set cross_attention to 0 (--cross-attn 0)"
            )
        return self.text_encoder.caption_ids(list(prompts))

    def control_images(self, frames):
        """Per-frame control images (T, 3, H, W) in [0, 1]."""
        raise ConfigError("ControlNet conditioning is only available with Stable Diffusion models")

    @torch.no_grad()
    def denoise(self, x, t, cond, control=None, control_scale=None):
        """One model call on latents x (B, C, h, w) at time t; control rows are weighted by `control_scale`."""
        if control is not None:
            raise ConfigError("ControlNet conditioning is only available with Stable Diffusion models")
        x = x.to(self.device, self.dtype)
        timestep = torch.full((x.shape[0],), float(t) * 1000.0 * self.transformer.config.timestep_scale,
                              device=self.device, dtype=self.dtype)  # (B,)
        mask = None if cond.mask is None else cond.mask.to(self.device)
        return self.transformer(x, cond.hidden.to(self.device, self.dtype), timestep, encoder_attention_mask=mask)

    def self_attention_processors(self):
        """The processors of every self-attention site, by site name."""
        return self._processors_ending(".attn1")

    def set_self_attention_processors(self, processors):
        """Replace the processors of the named self-attention sites."""
        self.transformer.set_attn_processor(processors)

    def cross_attention_processors(self):
        """The processors of every cross-attention site, by site name."""
        return self._processors_ending(".attn2")

    def _processors_ending(self, suffix):
        return {n: p for n, p in self.transformer.attn_processors.items() if n.endswith(suffix)}

    def set_cross_attention_processors(self, processors):
        """Replace the processors of the named cross-attention sites."""
        self.transformer.set_attn_processor(processors)

    def pnp_attention_sites(self):
        """Self-attention sites that take PnP query/key injection."""
        return list(self.pnp_sites)

    def feature_modules(self):
        """The module whose output takes PnP feature injection, by site name."""
        return {self.feature_site: self.transformer.get_submodule(self.feature_site)}

    def timesteps(self, steps):
        """Model-call times of a `steps`-step sampling run, noisiest first."""
        from ..sampling import schedule_from_scheduler_config

        sigmas = schedule_from_scheduler_config(self.scheduler_config, steps).sigmas  # (steps + 1,)
        return [float(s) for s in sigmas[:-1]]

    def move(self, x, out, t_from, t_to):
        """Flow-ODE Euler step: x + (sigma_to - sigma_from) * velocity (forward or backward in time)."""
        s_from = 0.0 if t_from is None else float(t_from)
        s_to = 0.0 if t_to is None else float(t_to)
        return x.float() + (s_to - s_from) * out.float()

    def inversion_time(self, t_from, t_to):
        """The time inversion evaluates the model at, moving from t_from to t_to."""
        # Explicit Euler towards noise: the velocity is taken where the latent is now.
        return 0.0 if t_from is None else float(t_from)
