"""Prompt in, images out: the SANA text-to-image pipeline (flow matching and SANA-Sprint).

Steps of one call: (1) validate inputs and bin the size, (2) encode prompts, (3) draw the initial
noise per image from its own seed, (4) run the solver over the guided model function, (5) decode
with the DC-AE (tiled when large), resize back to the requested size, convert to the output type.
The pipeline keeps no per-call state on ``self``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, InputError, SanaflowError, unknown_choice
from ..models.sana_transformer import IdentitySelfAttnProcessor, LinearSelfAttnProcessor, SelfAttnProcessor
from ..utils import SEED_MAX, SEED_MIN, is_int, is_real
from . import resolution
from .acceleration import CUDAGRAPH_COMPILE_MODES, CUDAGraphCache, compile_module, first_call_timer, shape_key
from .components import SanaComponents, load_components

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SIDE = 4096
NUM_TRAIN_TIMESTEPS = 1000
# Where an offloaded text encoder waits between calls.
OFFLOAD_DEVICE = torch.device("cpu")


@dataclass
class ImageOutput:
    """Images of one call, with the seed of each (None when the caller gave the noise)."""

    images: Any  # list[PIL.Image] | np.ndarray (B,H,W,3) | torch.Tensor (B,3,H,W) | latents
    seeds: list[int | None] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    def __getitem__(self, index: int) -> Any:
        """``out[0]`` is the images, as in diffusers' pipeline outputs (then the seeds, the prompts)."""
        return (self.images, self.seeds, self.prompts)[index]


def _as_prompt_list(prompt: str | Sequence[str], what: str = "prompt") -> list[str]:
    if not isinstance(prompt, (str, list, tuple)):
        raise InputError(f"{what} must be a string or a list of strings, got {type(prompt).__name__}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise InputError(f"{what} list is empty; give at least one prompt")
    for p in prompts:
        if not isinstance(p, str):
            raise InputError(f"{what} must be a string or a list of strings, got {type(p).__name__}")
    return prompts


def check_call_arguments(
    *, num_inference_steps, guidance_scale, pag_scale, seed, generator, latents, height, width,
    num_images_per_prompt, use_resolution_binning, pag_layers, flow_shift, callback, num_layers: int,
) -> None:
    """Refuse ill-typed or out-of-range arguments of a text-to-image call before any work is done."""
    for name, value in (("num_inference_steps", num_inference_steps), ("num_images_per_prompt", num_images_per_prompt)):
        if not is_int(value) or value < 1:
            raise InputError(f"{name} must be an int >= 1, got {value!r}")
    for name, value in (("guidance_scale", guidance_scale), ("pag_scale", pag_scale)):
        if not is_real(value) or not 0 <= value < float("inf"):  # refuses NaN as well
            raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    if flow_shift is not None:  # before any work; the schedule builders hold the range
        from ..sampling.schedules import check_flow_shift

        check_flow_shift(flow_shift, "flow_shift")
    for name, value in (("height", height), ("width", width)):
        if value is not None and (not is_int(value) or value < 1):
            raise InputError(f"{name} must be a positive int (or None for the model's size), got {value!r}")
    if not isinstance(use_resolution_binning, bool):
        raise InputError(f"use_resolution_binning must be True or False, got {use_resolution_binning!r}")
    if pag_layers is not None:
        if isinstance(pag_layers, (str, bytes)) or not isinstance(pag_layers, Sequence):
            raise InputError(f"pag_layers must be a list of block indices, got {pag_layers!r}")
        bad = [v for v in pag_layers if not is_int(v) or not 0 <= v < num_layers]
        if bad:
            raise InputError(f"pag_layers {bad} are not block indices; the transformer has blocks 0..{num_layers - 1}")
    if callback is not None and not callable(callback):
        raise InputError(f"callback must be callable, got {type(callback).__name__}")
    if seed is not None:
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
        bad = [v for v in seeds if not is_int(v) or not SEED_MIN <= v <= SEED_MAX]
        if bad or isinstance(seed, (str, bytes)):
            raise InputError(f"seed must be an int in [{SEED_MIN}, {SEED_MAX}] or a list of them, got {seed!r}")
    if generator is not None:
        gens = generator if isinstance(generator, list) else [generator]
        if not all(isinstance(g, torch.Generator) for g in gens):
            raise InputError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
    if latents is not None:
        if not isinstance(latents, torch.Tensor):
            raise InputError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if not latents.is_floating_point():
            raise InputError(f"latents must be a floating-point tensor, got {latents.dtype}")
        if not bool(torch.isfinite(latents).all()):
            raise InputError("latents hold NaN or infinite values")
        if seed is not None:  # a generator still draws SANA-Sprint's intermediate noise; a seed would not
            raise InputError("give latents or a seed, not both: the latents are the initial noise "
                             "(pass a generator for the noise of later Sprint steps)")


def _check_embeds(embeds: Any, mask: Any, what: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, L, channels) float tensor of caption features with its (B, L) 0/1 mask."""
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != channels \
            or not embeds.is_floating_point() or embeds.shape[0] == 0:
        got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise InputError(f"{what}_embeds must be a floating-point (B, L, {channels}) tensor of text features "
                         f"(B >= 1), got {got}")
    if mask is None:
        raise InputError(f"{what}_embeds needs its {what}_attention_mask (B, L): 1 for tokens, 0 for padding")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2]):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"{what}_attention_mask must be a {tuple(embeds.shape[:2])} tensor, got {got}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError(f"{what}_attention_mask must hold only 0 (padding) and 1 (token)")
    if not bool(torch.isfinite(embeds).all()):
        raise InputError(f"{what}_embeds hold NaN or infinite values")
    return embeds, mask


def _check_prompt_embeds(prompt, embeds, mask, negative_prompt, neg_embeds, neg_mask, channels: int):
    """None when prompts come as text; else ((embeds, mask), (neg embeds, neg mask) | None), checked."""
    if embeds is None:
        if mask is not None or neg_embeds is not None or neg_mask is not None:
            raise InputError("prompt_attention_mask / negative_prompt_embeds need prompt_embeds; with text "
                             "prompts pass prompt= and negative_prompt=")
        if prompt is None:
            raise InputError("give a prompt, or prompt_embeds with prompt_attention_mask")
        return None
    if prompt is not None:
        raise InputError("give prompt or prompt_embeds, not both")
    cond = _check_embeds(embeds, mask, "prompt", channels)
    if neg_embeds is None:
        if neg_mask is not None:
            raise InputError("negative_prompt_attention_mask needs negative_prompt_embeds")
        return cond, None
    if negative_prompt not in ("", None):
        raise InputError("give negative_prompt or negative_prompt_embeds, not both")
    neg = _check_embeds(neg_embeds, neg_mask, "negative_prompt", channels)
    if neg[0].shape != cond[0].shape:
        raise InputError(f"negative_prompt_embeds must have the shape of prompt_embeds, "
                         f"{tuple(cond[0].shape)}; got {tuple(neg[0].shape)}")
    return cond, neg


def pad_caption_pair(cond, uncond):
    """Give (hidden (B, L, C), mask (B, L)) pairs one caption length: the shorter gets padding columns.

    A padding column (mask 0) adds nothing to the cross-attention, so this changes no output; it lets
    caption features of another length (e.g. trimmed ones from `encode_prompts`) share a CFG batch.
    """
    length = max(cond[1].shape[1], uncond[1].shape[1])

    def pad(pair):
        h, m = pair
        extra = length - m.shape[1]
        if extra == 0:
            return h, m
        return (torch.cat([h, h.new_zeros(h.shape[0], extra, h.shape[2])], 1),
                torch.cat([m, m.new_zeros(m.shape[0], extra)], 1))

    return pad(cond), pad(uncond)


CAPTION_TRIM_MULTIPLE = 64


def trim_caption_padding(cond, uncond=None, multiple: int = CAPTION_TRIM_MULTIPLE):
    """Cut (hidden (B, L, C), mask (B, L)) pairs to the caption columns some prompt uses.

    The caption goes into the transformer only through its cross-attention, token by token, where a
    padded token gets the bias -1e4: its softmax weight is exactly 0 in float32 beside any real
    token. A column that is padding in every row of `cond` and `uncond` therefore changes nothing
    beyond the rounding of a shorter reduction, and dropping the trailing ones makes every cross-attention cheaper (SANA pads prompts to 300
    tokens; a typical prompt fills a few dozen, complex-human-instruction prompts included, since
    their window ends at the prompt). The kept length is rounded up to `multiple` (so that compiled
    graphs and CUDA graphs see a handful of caption lengths, not one per prompt) and never exceeds
    L. Pairs with a row of no valid token (its softmax is the uniform one over all L columns) are
    returned unchanged. Reads the masks on the host once per call.
    """
    pairs = [cond] + ([uncond] if uncond is not None else [])
    length = cond[1].shape[1]
    if any(m.shape[1] != length for _, m in pairs):
        return cond, uncond
    used = torch.cat([m for _, m in pairs]).ne(0)  # (rows, L)
    if not bool(used.any(1).all()):
        return cond, uncond
    last = int(used.any(0).nonzero().max()) + 1  # one past the last column any row uses
    keep = min(length, -(-last // multiple) * multiple)
    if keep == length:
        return cond, uncond
    cut = [(h[:, :keep], m[:, :keep]) for h, m in pairs]
    return cut[0], (cut[1] if uncond is not None else None)


def noise_for_seeds(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise, one image per seed, drawn on the CPU so every device gives the same noise."""
    out = []
    for s in seeds:
        g = torch.Generator("cpu").manual_seed(int(s))
        out.append(torch.randn(shape, generator=g, dtype=torch.float32))
    return torch.stack(out)  # (B, C, h, w)


def noise_from_generator(generator: torch.Generator | list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise from a caller's generator (one for the batch, or one per image), on its device."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise InputError(f"got {len(generator)} generators for {shape[0]} images")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator])
    return torch.randn(shape, generator=generator, device=generator.device)


def to_output(images: torch.Tensor, output_type: str) -> Any:
    """Convert decoded images in [-1, 1] (B,3,H,W) to pil / np / pt in [0, 1]."""
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images.cpu()
    arr = images.cpu().permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    if output_type == "np":
        return arr
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


class TextToImagePipeline:
    """SANA text-to-image: transformer + DC-AE + text encoder + a flow-matching solver.

    Opt-in speed and memory settings (they change how, not what, is computed):

    - `compile(...)`: torch.compile the transformer (and optionally the DC-AE decoder), one graph,
      static shapes; the first call at each new size compiles (logged).
    - `cuda_graphs = True` (CUDA only): capture the per-step transformer call as a CUDA graph for the
      (batch, size) of a call and replay it at every step; graphs are cached for the next calls at the
      same shapes (`release_cuda_graphs()` frees them).
    - `offload_text_encoder = True`: keep the text encoder on the CPU between calls; it moves to the
      device to encode, then back (for 4K within a small memory budget).
    """

    def __init__(self, components: SanaComponents, device: torch.device, offload_text_encoder: bool = False,
                 cuda_graphs: bool = False):
        self.components = components
        self.transformer = components.transformer
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.scheduler_config = components.scheduler_config
        self.device = device
        # Fast-path state: what was compiled and the shapes already compiled (for the first-call log),
        # captured CUDA graphs. None of it changes results.
        self._compiled_transformer: Callable | None = None
        self._compiled_decoder: Callable | None = None
        self._compile_mode: str | None = None
        self._compiled_shapes: set = set()
        self._graphs = CUDAGraphCache()
        self._cuda_graphs = False
        self._offload = False
        # One PAG processor for every call (its `rows` is set before each transformer call): a compiled
        # graph or a cached CUDA graph made in one call then serves the next ones too.
        self._pag_processor = PAGSelfAttnProcessor()
        self.offload_device = OFFLOAD_DEVICE
        self.cuda_graphs = cuda_graphs
        self.offload_text_encoder = offload_text_encoder
        # Drop the caption columns that are padding in every prompt of the batch (see
        # `trim_caption_padding`): same images, cross-attention over fewer tokens.
        self.trim_caption = True

    @classmethod
    def from_pretrained(cls, ref: str | os.PathLike | None = None, device=None, dtype=None,
                        offload_text_encoder: bool = False, cuda_graphs: bool = False,
                        variant: str | None = None) -> TextToImagePipeline:
        """Load from a diffusers-format folder, a built-in name or a hub repo id (None = embedded model).

        `variant` ("fp16" / "bf16") reads those weight files where the folder has them (`load_components`).
        """
        components, dev = load_components(ref, device=device, dtype=dtype, variant=variant)
        return cls(components, dev, offload_text_encoder=offload_text_encoder, cuda_graphs=cuda_graphs)

    # ---------------------------------------------------------------------------------- fast paths
    def compile(self, mode: str | None = None, backend: str = "inductor", decoder: bool = False,
                regional: bool = False) -> TextToImagePipeline:
        """torch.compile the transformer (fullgraph, static shapes), and the DC-AE decoder with `decoder=True`.

        `mode` is torch.compile's (None, "max-autotune-no-cudagraphs", ...); `backend` e.g. "aot_eager"
        for a cheap check on CPU. `regional=True` compiles one transformer block graph that every
        block reuses (seconds instead of a minute to compile; best with `cuda_graphs`, see
        `compile_module`). The decoder is compiled for untiled decodes only (tiled decodes run
        eager). Returns the pipeline.
        """
        if mode in CUDAGRAPH_COMPILE_MODES and self.cuda_graphs:
            raise ConfigError(f"compile mode {mode!r} captures CUDA graphs itself; with cuda_graphs=True use "
                              "mode=None or 'max-autotune-no-cudagraphs'")
        self._compiled_transformer = compile_module(self.transformer, mode, backend, regional=regional)
        self._compiled_decoder = compile_module(self.vae.decoder, mode, backend) if decoder else None
        self._compile_mode = mode
        self._compiled_shapes.clear()
        self._graphs.clear()
        logger.info("torch.compile (backend %s, mode %s) on for the transformer%s%s; the first call at each new "
                    "image size compiles", backend, mode, " (per block)" if regional else "",
                    " and the DC-AE decoder" if decoder else "")
        return self

    def quantize(self, mode: str) -> TextToImagePipeline:
        """Quantize the transformer in place: "int8" (weight-only, CPU and GPU) or "fp8" (sm_89+ GPUs).

        Call before `compile()`. Returns the pipeline. `sanaflow quantize` saves a quantized model
        instead, which loads without this step.
        """
        from ..quant import quantize_transformer

        if self.compiled:
            raise ConfigError("quantize the pipeline before compile(): the compiled graph holds the float layers")
        quantize_transformer(self.transformer, mode)
        self._graphs.clear()  # captured graphs hold the float weights' addresses
        logger.info("transformer quantized (%s)", mode)
        return self

    @property
    def compiled(self) -> bool:
        """True once `compile()` was called."""
        return self._compiled_transformer is not None

    @property
    def cuda_graphs(self) -> bool:
        """Whether the per-step transformer call is replayed from captured CUDA graphs (CUDA only)."""
        return self._cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, value: bool) -> None:
        if value and self.device.type != "cuda":
            raise SanaflowError(f"CUDA graphs need a CUDA device; this pipeline runs on {self.device}. "
                                "Drop cuda_graphs (--cuda-graphs) or use --device cuda")
        if value and self._compile_mode in CUDAGRAPH_COMPILE_MODES:
            raise ConfigError(f"the pipeline is compiled with mode {self._compile_mode!r}, which captures CUDA "
                              "graphs itself; recompile with mode=None to use cuda_graphs")
        self._cuda_graphs = bool(value)
        if not value:
            self._graphs.clear()

    def release_cuda_graphs(self) -> None:
        """Free the captured CUDA graphs and their memory (they are captured again when needed)."""
        self._graphs.clear()

    @property
    def offload_text_encoder(self) -> bool:
        """Whether the text encoder waits on the CPU between calls (moved to the device only to encode)."""
        return self._offload

    @offload_text_encoder.setter
    def offload_text_encoder(self, value: bool) -> None:
        if value:
            self._park_text_encoder()
        elif self._offload:
            self.text_encoder.to(self.device)  # back for good
        self._offload = bool(value)

    @contextlib.contextmanager
    def _text_encoder_on_device(self):
        """The text encoder on the pipeline's device while encoding; parked again after, when offloaded."""
        if self._offload:
            self.text_encoder.to(self.device)
        try:
            yield
        finally:
            if self._offload:
                self._park_text_encoder()

    def _park_text_encoder(self) -> None:
        self.text_encoder.to(self.offload_device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the encoder's blocks back, so the sampler's peak can reuse them

    # ---------------------------------------------------------------------------------- info
    @property
    def name(self) -> str:
        """The model reference this pipeline was loaded from."""
        return self.components.name

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (32 for SANA's DC-AE)."""
        return self.vae.spatial_compression_ratio

    @property
    def is_sprint(self) -> bool:
        """True for guidance-distilled SANA-Sprint models (TrigFlow few-step sampling)."""
        return bool(self.transformer.config.guidance_embeds)

    @property
    def native_size(self) -> int:
        """The model's base resolution in pixels."""
        return int(self.transformer.config.sample_size) * self.vae_scale

    # ---------------------------------------------------------------------------------- parts
    def encode_prompts(self, prompts: list[str], negative: list[str] | None):
        """Text features (hidden, mask) of prompts and, when given, of negative prompts (no CHI prefix)."""
        for p in prompts:
            if not p.strip():
                raise InputError("empty prompt; describe the image you want")
        with self._text_encoder_on_device():
            cond = self.text_encoder.encode(prompts)
            uncond = self.text_encoder.encode(negative, use_instruction=False) if negative is not None else None
        if self.trim_caption:
            cond, uncond = trim_caption_padding(cond, uncond)
        return cond, uncond

    def _given_features(self, given, negatives: list[str] | None, repeat: int):
        """(cond, uncond) from `__call__`'s prompt_embeds: repeated per image, the negatives encoded if not given."""
        (hidden, mask), neg = given

        def per_image(pair):
            h, m = pair
            return (h.to(self.device).repeat_interleave(repeat, 0),
                    m.to(self.device, torch.long).repeat_interleave(repeat, 0))

        cond = per_image((hidden, mask))
        uncond = None
        if negatives is not None:  # guidance on
            if neg is not None:
                uncond = per_image(neg)
            else:
                with self._text_encoder_on_device():
                    uncond = self.text_encoder.encode(negatives, use_instruction=False)
                cond, uncond = pad_caption_pair(cond, uncond)
        if self.trim_caption:
            cond, uncond = trim_caption_padding(cond, uncond)
        return cond, uncond

    def _transformer_call(self, pag: PAGSelfAttnProcessor | None = None, pag_layers: Sequence[int] = ()):
        """The per-step transformer call `(x, context, timestep, mask, guidance, perturbed) -> output`.

        Eager, compiled (`compile()`) and/or replayed from a CUDA graph (`cuda_graphs`); all keyword
        arguments are tensors or None, so a CUDA graph can take every one of them as an input.
        """
        net = self.transformer if self._compiled_transformer is None else self._compiled_transformer
        reduce_overhead = self._compile_mode in CUDAGRAPH_COMPILE_MODES

        def call(x, context, timestep, mask, guidance, perturbed):
            if pag is not None:
                pag.rows = perturbed  # explicit per-call state of the PAG processors
            if reduce_overhead:
                torch.compiler.cudagraph_mark_step_begin()  # each step is a new run of torch's graphs
            out = net(x, context, timestep, encoder_attention_mask=mask, guidance=guidance)  # (B, C_out, h, w)
            # torch's own CUDA graphs overwrite their outputs on the next replay: keep a copy.
            return out.clone() if reduce_overhead else out

        def timed_call(x, context, timestep, mask, guidance, perturbed):
            inputs = {"x": x, "context": context, "timestep": timestep, "mask": mask, "guidance": guidance,
                      "perturbed": perturbed}
            key = (shape_key(inputs), tuple(pag_layers))
            with first_call_timer(self._compiled_shapes, key, "transformer", self.device):
                return call(**inputs)

        step_call = call if self._compiled_transformer is None else timed_call
        if not self._cuda_graphs:
            return step_call
        # What a graph bakes in besides its inputs: the weight tensors and the attention processors.
        signature = (
            tuple((id(t), t.dtype, t.device) for t in (*self.transformer.parameters(), *self.transformer.buffers())),
            tuple(type(p).__qualname__ for p in self.transformer.attn_processors.values()),
            tuple(pag_layers) if pag is not None else None,
            self._compiled_transformer is not None,
        )
        graphs = self._graphs

        def replayed(x, context, timestep, mask, guidance, perturbed):
            return graphs.run(signature, step_call, x=x, context=context, timestep=timestep, mask=mask,
                              guidance=guidance, perturbed=perturbed)

        return replayed

    def _model_fn(self, timestep_of: Callable[[torch.Tensor], torch.Tensor], pag: PAGSelfAttnProcessor | None,
                  pag_layers: Sequence[int] = ()):
        """The flow model function `(x, sigma, **cond) -> velocity` (float32) for one schedule."""
        cfg = self.transformer.config
        dtype = self.transformer.dtype
        call = self._transformer_call(pag, pag_layers)

        def model_fn(x, sigma, encoder_hidden_states, encoder_attention_mask, perturbed=None):
            t = timestep_of(sigma).to(self.device, torch.float32) * cfg.timestep_scale  # (B,)
            v = call(x=x.to(dtype), context=encoder_hidden_states.to(dtype), timestep=t.to(dtype),
                     mask=encoder_attention_mask, guidance=None, perturbed=perturbed).float()  # (B, C_out, h, w)
            if cfg.out_channels == 2 * cfg.in_channels:  # learned sigma: keep the velocity half
                v = v[:, : cfg.in_channels]
            return v

        return model_fn

    def decode(self, latents: torch.Tensor, tiling: str | bool = "auto") -> torch.Tensor:
        """Latents (scaled, as sampled) -> images in [-1, 1]."""
        scaling = self.vae.config.scaling_factor
        z = latents.to(self.vae.dtype) / scaling  # (B, C, h, w)
        f = self.vae_scale
        if self._compiled_decoder is not None and not self.vae.wants_tiling(z.shape[-2] * f, z.shape[-1] * f, tiling):
            key = shape_key({"z": z})
            with first_call_timer(self._compiled_shapes, key, "DC-AE decoder", self.device):
                return self._compiled_decoder(z)  # (B, 3, H, W)
        return self.vae.decode(z, tiling=tiling)

    # ---------------------------------------------------------------------------------- call
    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.5,
        pag_scale: float = 0.0,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        sampler: str = "dpm++2m",
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        callback: Callable[[dict], None] | None = None,
        use_resolution_binning: bool = True,
        pag_layers: Sequence[int] | None = None,
        flow_shift: float | None = None,
        progress: bool = False,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
    ) -> ImageOutput:
        """Generate images for `prompt` (a string or a list); see the class docstring for the steps.

        Instead of `prompt`, text features may come precomputed, as in diffusers' ``SanaPipeline``:
        `prompt_embeds` (B, L, caption_channels) with its `prompt_attention_mask` (B, L) (1 = token,
        0 = padding), e.g. ``cond`` of `encode_prompts`; likewise `negative_prompt_embeds` / its mask
        (same shape) for classifier-free guidance, else `negative_prompt` is encoded. The text encoder
        then does not run for the prompts (or at all, with both given).
        """
        from .. import sampling

        # 1. Inputs and size
        given = _check_prompt_embeds(prompt, prompt_embeds, prompt_attention_mask, negative_prompt,
                                     negative_prompt_embeds, negative_prompt_attention_mask,
                                     self.transformer.config.caption_channels)
        prompts = _as_prompt_list(prompt) if given is None else [""] * given[0][0].shape[0]
        if output_type not in OUTPUT_TYPES:
            raise unknown_choice("output_type", output_type, OUTPUT_TYPES)
        check_call_arguments(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, pag_scale=pag_scale, seed=seed,
            generator=generator, latents=latents, height=height, width=width,
            num_images_per_prompt=num_images_per_prompt, use_resolution_binning=use_resolution_binning,
            pag_layers=pag_layers, flow_shift=flow_shift, callback=callback,
            num_layers=self.transformer.config.num_layers,
        )
        if sampler == "scm" and not self.is_sprint:
            raise InputError("sampler 'scm' is SANA-Sprint's (TrigFlow) and this is a flow-matching model; "
                             "use euler or dpm++2m")
        sampler_name = "scm" if self.is_sprint else sampler
        sample_fn = sampling.get_sampler(sampler_name)
        height = height or self.native_size
        width = width or self.native_size
        resolution.check_size(height, width, 32, MAX_SIDE)
        gen_h, gen_w = height, width
        bins = resolution.bins_for_native(self.native_size)
        if use_resolution_binning and bins is not None:
            gen_h, gen_w = resolution.nearest_bin(height, width, bins)
        if gen_h % self.vae_scale or gen_w % self.vae_scale:
            raise InputError(f"size {gen_w}x{gen_h} is not a multiple of the autoencoder's {self.vae_scale} px")

        # Prompts repeat per image: [p0, p0, p1, p1, ...] as diffusers orders them.
        batch_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch = len(batch_prompts)
        negatives = None
        negs = _as_prompt_list(negative_prompt, "negative_prompt") if not isinstance(negative_prompt, str) else [negative_prompt] * len(prompts)
        if len(negs) != len(prompts):
            raise InputError(f"got {len(negs)} negative prompts for {len(prompts)} prompts")
        if guidance_scale > 1.0 and not self.is_sprint:
            negatives = [n for n in negs for _ in range(num_images_per_prompt)]

        # 2. Text features
        if given is None:
            cond, uncond = self.encode_prompts(batch_prompts, negatives)
        else:
            cond, uncond = self._given_features(given, negatives, num_images_per_prompt)

        # 3. Initial noise
        c = self.transformer.config.in_channels
        shape = (c, gen_h // self.vae_scale, gen_w // self.vae_scale)
        seeds: list[int | None]
        if latents is not None:
            if tuple(latents.shape) != (batch, *shape):
                raise InputError(f"latents have shape {tuple(latents.shape)}; expected {(batch, *shape)}")
            x = latents.to(self.device, torch.float32)
            seeds = [None] * batch
            generators = generator
        elif generator is not None:
            x = noise_from_generator(generator, (batch, *shape)).to(self.device)
            seeds = [None] * batch
            generators = generator
        else:
            if seed is None:
                seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
            if not isinstance(seed, (list, tuple)) and int(seed) + batch - 1 > SEED_MAX:
                raise InputError(f"seed {seed} + {batch - 1} (one seed per image) is above the largest seed, {SEED_MAX}")
            seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(batch)]
            if len(seeds) != batch:
                raise InputError(f"got {len(seeds)} seeds for {batch} images")
            generators = [torch.Generator("cpu").manual_seed(int(sd)) for sd in seeds]
            x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)  # (B, C, h, w)

        # 4. Sampling
        x = self._sample(sample_fn, x, cond, uncond, num_inference_steps, guidance_scale, pag_scale,
                         pag_layers, callback, progress, generators, flow_shift)
        del cond, uncond  # the text features are not needed for decoding: free them first
        if not bool(torch.isfinite(x).all()):  # one sync; a NaN image would otherwise come out black
            dtype = self.transformer.dtype
            hint = "" if dtype == torch.float32 else f", or {dtype} overflows: try float32"
            raise SanaflowError(f"sampling produced NaN or infinite latents: check the checkpoint's weights for "
                                f"NaN/inf{hint}")

        # 5. Decode and convert
        if output_type == "latent":
            return ImageOutput(x, seeds, batch_prompts)
        images = self.decode(x)
        if use_resolution_binning and (gen_h, gen_w) != (height, width):
            images = resolution.resize_and_center_crop(images, height, width)
        return ImageOutput(to_output(images, output_type), seeds, batch_prompts)

    def _sample(self, sample_fn, x, cond, uncond, steps, guidance_scale, pag_scale, pag_layers, callback,
                progress, generators, flow_shift=None):
        from .. import sampling

        hidden, mask = cond
        cond_args = {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}
        uncond_args = None
        if uncond is not None:
            uncond_args = {"encoder_hidden_states": uncond[0], "encoder_attention_mask": uncond[1]}
        if self.is_sprint:
            return self._sample_sprint(sample_fn, x, cond_args, steps, guidance_scale, callback, progress, generators)
        schedule = sampling.schedule_from_scheduler_config(self.scheduler_config, steps, flow_shift)
        use_pag = pag_scale > 0
        pag_proc = self._pag_processor if use_pag else None
        layers = list(pag_layers) if pag_layers is not None else list(DEFAULT_PAG_LAYERS(self.transformer.config.num_layers))
        model = self._model_fn(schedule.timestep_of, pag_proc, layers if use_pag else ())
        if use_pag:
            guided = sampling.pag(model, guidance_scale, pag_scale)
        elif guidance_scale > 1.0:
            guided = sampling.cfg(model, guidance_scale)
        else:  # as the reference pipeline: no negative branch at all for scale <= 1
            guided = sampling.cfg(model, 1.0)
        extra = {"cond": cond_args, "uncond": uncond_args}
        if pag_proc is None:
            return sample_fn(guided, x, schedule.sigmas, extra_args=extra, callback=callback, disable=not progress)
        try:
            with swapped_self_attention(self.transformer, layers, pag_proc):
                return sample_fn(guided, x, schedule.sigmas, extra_args=extra, callback=callback, disable=not progress)
        finally:
            pag_proc.rows = None

    def _sample_sprint(self, sample_fn, x, cond_args, steps, guidance_scale, callback, progress, generators):
        from .. import sampling

        cfg = self.transformer.config
        dtype = self.transformer.dtype
        guidance = torch.full((x.shape[0],), float(guidance_scale), device=self.device) * cfg.guidance_embeds_scale
        call = self._transformer_call()

        def flow_model(x_in, s, encoder_hidden_states, encoder_attention_mask):
            t = s.to(dtype)  # Sprint feeds the flow sigma itself (no x1000, no timestep_scale), as the reference
            v = call(x=x_in.to(dtype), context=encoder_hidden_states.to(dtype), timestep=t,
                     mask=encoder_attention_mask, guidance=guidance.to(dtype), perturbed=None)
            return v.float()

        timesteps = sampling.scm_timesteps(steps).to(self.device)
        return sample_fn(sampling.trigflow_model_fn(flow_model), x, timesteps, extra_args=cond_args,
                         callback=callback, disable=not progress, generator=generators)


def DEFAULT_PAG_LAYERS(num_layers: int) -> tuple[int, ...]:  # noqa: N802 - a constant rule
    """PAG's default perturbed blocks: the middle one (SANA's PAG pipelines use a mid block)."""
    return (num_layers // 2,)


class PAGSelfAttnProcessor(SelfAttnProcessor):
    """Self-attention that uses the identity attention map on the rows in `self.rows` (PAG's perturbed branch).

    `rows` is the explicit per-call state: a (B,) bool tensor set by the model function before each
    transformer call (None = no perturbed rows).
    """

    def __init__(self):
        self.rows: torch.Tensor | None = None
        self._normal = LinearSelfAttnProcessor()
        self._identity = IdentitySelfAttnProcessor()

    def __call__(self, attn, hidden_states, height, width):
        normal = self._normal(attn, hidden_states, height, width)  # (B, N, D)
        if self.rows is None:
            return normal
        # Both maps on every row, then a per-row select: no data-dependent indexing or host sync, so
        # the call compiles into one graph and can be captured as a CUDA graph. The extra work is the
        # (cheap) identity map plus normal attention on the perturbed rows, in the PAG blocks only.
        identity = self._identity(attn, hidden_states, height, width)  # (B, N, D)
        return torch.where(self.rows[:, None, None], identity, normal)  # (B, N, D)


@contextlib.contextmanager
def swapped_self_attention(transformer, layers, processor):
    """Use `processor` as the self-attention of blocks `layers` inside the `with` block."""
    n = transformer.config.num_layers
    bad = [i for i in layers if not 0 <= int(i) < n]
    if bad:
        raise InputError(f"PAG layers {bad} out of range; the transformer has blocks 0..{n - 1}")
    old = transformer.attn_processors
    transformer.set_attn_processor({f"transformer_blocks.{int(i)}.attn1": processor for i in layers})
    try:
        yield
    finally:
        transformer.set_attn_processor(old)


def load_pipeline(ref: str | os.PathLike | None = None, device=None, dtype=None, compile: bool = False,
                  offload_text_encoder: bool = False, cuda_graphs: bool = False,
                  compile_regional: bool = False, quantize: str | None = None,
                  variant: str | None = None) -> TextToImagePipeline:
    """Load a text-to-image pipeline (None = the embedded default model); see TextToImagePipeline for the options.

    `compile_regional` compiles per transformer block (`TextToImagePipeline.compile(regional=True)`); it implies
    `compile`. `quantize` ("int8" / "fp8") quantizes the transformer after loading (`TextToImagePipeline.quantize`).
    `variant` ("fp16" / "bf16") reads the repo's variant weight files where it has them.
    """
    pipe = TextToImagePipeline.from_pretrained(ref, device=device, dtype=dtype, variant=variant,
                                               offload_text_encoder=offload_text_encoder, cuda_graphs=cuda_graphs)
    if quantize is not None:
        pipe.quantize(quantize)
    if compile or compile_regional:
        pipe.compile(regional=compile_regional)
    return pipe
