"""VideoEditPipeline: a video and a prompt in, the TokenFlow-edited video out.

Steps of one call: 1. read and resize the frames to the backbone's multiple; 2. find the inversion
in the cache or invert (and optionally reconstruct) the video; 3. run the edit loop; 4. decode.
The pipeline holds only the backbone and the cache folder; every per-call value stays local.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..tokenflow.backbones import Backbone, load_backbone
from ..tokenflow.blend import paste_source as paste_source_pixels
from ..tokenflow.editor import EditSettings, calls_per_step, edit_latents
from ..tokenflow.inversion import (
    InversionKey,
    LatentCache,
    decode_latents,
    default_cache_dir,
    encode_frames,
    inversion_schedule,
    invert_latents,
    sample_plain,
    video_hash,
)
from ..utils import check_folder_writable
from ..video import DEFAULT_FPS, VideoClip, check_fps, check_selection, read_video, resize_crop

DEFAULT_MAX_SIDE = 512  # frames above this are downsized unless a size is given (TokenFlow works at 512)
# Fixed-point refinements per step of an inversion run on the editing schedule (see `invert_latents`):
# plain Euler / DDIM inversion with 50 steps does not retrace under the sampler (the source video's
# reconstruction drifts and flickers), 5 refinements make it retrace (6x the inversion's model calls).
DEFAULT_INVERSION_REFINE = 5


@dataclass
class InversionResult:
    """A cached inversion, whether it was reused, and the reconstruction when one was made."""

    cache: LatentCache
    reused: bool
    reconstruction: np.ndarray | None = None  # (T, H, W, 3) uint8


@dataclass
class VideoEditOutput:
    """Edited frames (T, H, W, 3) uint8, the resized source frames, fps and the inversion used."""

    frames: np.ndarray
    source: np.ndarray
    fps: float
    inversion: InversionResult


class _Progress:
    """A tqdm bar (or nothing) counting denoiser calls."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="call", leave=False)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _frames_array(video: np.ndarray | list | tuple) -> np.ndarray:
    """Frames given as an array (T, H, W, 3) or a list of (H, W, 3) arrays -> one uint8 array (T, H, W, 3)."""
    if isinstance(video, list | tuple):
        if not video:
            raise InputError("the list of frames is empty; give at least one (H, W, 3) uint8 frame")
        frames = [np.asarray(f) for f in video]
        bad = [i for i, f in enumerate(frames) if f.ndim != 3 or f.shape[-1] != 3 or f.dtype != np.uint8]
        if bad:
            f = frames[bad[0]]
            raise InputError(f"frame {bad[0]} of the list must be an (H, W, 3) uint8 RGB array, got {f.dtype} "
                             f"{tuple(f.shape)}")
        sizes = sorted({f.shape[:2] for f in frames})
        if len(sizes) > 1:
            raise InputError(f"the frames of the list differ in size (H, W): {sizes}")
        return np.stack(frames)  # (T, H, W, 3)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise InputError(f"frames must be a (T, H, W, 3) uint8 array, got {video.dtype} {tuple(video.shape)}")
    return video


class VideoEditPipeline:
    """Text-driven video editing with TokenFlow on a SANA or Stable Diffusion backbone."""

    def __init__(self, backbone: Backbone, cache_dir: str | os.PathLike | None = None):
        self.backbone = backbone
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    @classmethod
    def from_pretrained(
        cls,
        ref: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        controlnet: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        variant: str | None = None,
    ) -> VideoEditPipeline:
        """Load the backbone of `ref` (None: the embedded default model); SD folders may add a ControlNet.

        `variant` ("fp16", "bf16") reads those weight files where a component has them.
        """
        from .components import pick_device, pick_dtype

        dev = pick_device(device)
        tdtype = None if dtype is None else pick_dtype(dtype, dev)
        return cls(load_backbone(ref, device=dev, dtype=tdtype, controlnet=controlnet, variant=variant),
                   cache_dir=cache_dir)

    # 1. frames ------------------------------------------------------------------------------

    def prepare(
        self,
        video: str | os.PathLike | np.ndarray | list[np.ndarray] | VideoClip,
        frames: int | None = None,
        start: int = 0,
        stride: int = 1,
        size: int | tuple[int, int] | None = None,
        fps: float | None = None,
    ) -> VideoClip:
        """Read (if a path) and resize/crop frames to the backbone's multiple; `size` as in `resize_crop`.

        `video` is a video file or frame folder, a (T, H, W, 3) uint8 array, a list of (H, W, 3) uint8
        frames, or a `VideoClip`. `fps` overrides the frame rate (arrays and lists: DEFAULT_FPS).
        """
        check_selection(frames, start, stride)
        if fps is not None:
            check_fps(fps)
        if isinstance(video, VideoClip):
            clip = VideoClip(video.frames[start::stride][:frames], fps or video.fps / stride)
        elif isinstance(video, np.ndarray | list | tuple):
            array = _frames_array(video)
            clip = VideoClip(array[start::stride][:frames], fps or DEFAULT_FPS)
        elif isinstance(video, str | os.PathLike):
            clip = read_video(video, frames=frames, start=start, stride=stride, fps=fps)
        else:
            raise InputError(f"video must be a path (a video file or a folder of frames), a (T, H, W, 3) uint8 "
                             f"array, a list of (H, W, 3) uint8 frames or a VideoClip; got {type(video).__name__}")
        if clip.num_frames == 0:
            raise InputError("no frames selected (check --frames, --start and --stride)")
        if size is None and max(clip.size) > DEFAULT_MAX_SIDE:
            size = DEFAULT_MAX_SIDE
        return VideoClip(resize_crop(clip.frames, self.backbone.multiple, size), clip.fps)

    # 2. inversion ---------------------------------------------------------------------------

    def invert(
        self,
        clip: VideoClip,
        source_prompt: str = "",
        steps: int = 50,
        inversion_steps: int | None = None,
        batch_size: int = 8,
        reconstruct: bool = False,
        progress: bool = True,
        inversion_refine: int | None = None,
    ) -> InversionResult:
        """Invert the frames (or reuse the cached inversion); optionally sample the reconstruction back.

        `inversion_refine` fixed-point iterations per step make the inversion the inverse of the
        sampler's step (see `invert_latents`); 0 is plain DDIM / Euler inversion. None:
        DEFAULT_INVERSION_REFINE when the inversion runs on the editing schedule (the fast default),
        0 for a longer inversion schedule (TokenFlow's 500 steps), whose small steps cost enough.
        """
        if steps < 1 or (inversion_steps is not None and inversion_steps < 1) or batch_size < 1:
            raise InputError("--steps, --inversion-steps and the batch sizes must be at least 1")
        backbone = self.backbone
        inversion_steps = inversion_steps or steps
        if inversion_refine is None:
            inversion_refine = DEFAULT_INVERSION_REFINE if inversion_steps == steps else 0
        if inversion_refine < 0:
            raise InputError(f"--inversion-refine must be at least 0, got {inversion_refine}")
        h, w = clip.size
        key = InversionKey(
            video=video_hash(clip.frames), model=backbone.name, height=h, width=w, num_frames=clip.num_frames,
            steps=steps, inversion_steps=inversion_steps, prompt=source_prompt, refine=inversion_refine,
        )
        cache = LatentCache.find(self.cache_dir, key)
        reused = cache is not None
        if cache is None:
            # Before the inversion's work: its result must have somewhere to go.
            check_folder_writable(self.cache_dir, f"the inversion cache into {str(self.cache_dir)!r} (cache_dir)")
            clean = encode_frames(backbone, clip.frames, batch_size)  # (T, C, h, w)
            cond = backbone.embed([source_prompt])
            n_chunks = -(-clip.num_frames // batch_size)
            calls = n_chunks * len(inversion_schedule(backbone, steps, inversion_steps)) * (1 + inversion_refine)
            bar = _Progress(calls, "inversion", progress)
            try:
                latents = invert_latents(backbone, clean, cond, steps, inversion_steps, batch_size, bar,
                                         refine=inversion_refine)
            finally:
                bar.close()
            cache = LatentCache.write(self.cache_dir, key, backbone.timesteps(steps), latents)
        recon = None
        if reconstruct:
            # The reconstruction is kept beside the latents, so a reused inversion does not resample it.
            recon = cache.reconstruction()
            if recon is None:
                recon = self.reconstruct(cache, source_prompt, batch_size, progress)
                cache.save_reconstruction(recon, clip.fps)
        return InversionResult(cache, reused, recon)

    def reconstruct(self, cache: LatentCache, source_prompt: str = "", batch_size: int = 8,
                    progress: bool = True) -> np.ndarray:
        """Sample the inverted latents back to frames without guidance (judges the inversion)."""
        x = cache.latents(0)
        bar = _Progress(-(-len(x) // batch_size) * len(cache.timesteps), "reconstruction", progress)
        try:
            z = sample_plain(self.backbone, x, self.backbone.embed([source_prompt]), cache.timesteps, batch_size,
                             progress=bar)
        finally:
            bar.close()
        return decode_latents(self.backbone, z, batch_size)

    # 3.-4. edit -----------------------------------------------------------------------------

    @staticmethod
    def settings(prompt: str, negative_prompt: str | None = None, guidance_scale: float | None = None,
                 **knobs: Any) -> EditSettings:
        """The validated `EditSettings` of an edit, without a model (the CLI checks its flags with it first).

        `knobs` are `EditSettings` fields; `negative_prompt` / `guidance_scale` None (the backbone's
        defaults, filled in by `__call__`) are judged as TokenFlow's, which are valid.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the edit needs a non-empty --prompt")
        fields = {f.name for f in dataclasses.fields(EditSettings)}
        unknown = sorted(set(knobs) - fields)
        if unknown:
            raise InputError(f"unknown edit setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        given = {"negative_prompt": negative_prompt, "guidance_scale": guidance_scale}
        settings = EditSettings(prompt=prompt, **{k: v for k, v in given.items() if v is not None}, **knobs)
        settings.validate()
        return settings

    def __call__(
        self,
        video: str | os.PathLike | np.ndarray | list[np.ndarray] | VideoClip,
        prompt: str,
        source_prompt: str = "",
        negative_prompt: str | None = None,
        mode: str = "tokenflow-pnp",
        steps: int = 50,
        inversion_steps: int | None = None,
        guidance_scale: float | None = None,
        pnp_feature: float = 0.8,
        pnp_attention: float = 0.5,
        cross_attention: float | None = None,
        cross_reweight: float | None = None,
        propagation: float | None = None,
        output_propagation: float | None = None,
        output_propagation_steps: float | None = None,
        output_correspondence: str = "flow",
        strength: float = 0.9,
        batch_size: int = 8,
        inversion_batch_size: int | None = None,
        inversion_refine: int | None = None,
        seed: int = 1,
        correspondence: str = "features",
        control_scale: float | None = None,
        offload_keyframes: bool | None = None,
        max_keyframes: int | None = 32,
        local_blend: float | None = None,
        paste_source: bool = True,
        frames: int | None = None,
        start: int = 0,
        stride: int = 1,
        size: int | tuple[int, int] | None = None,
        reconstruct: bool = False,
        progress: bool = True,
        fps: float | None = None,
    ) -> VideoEditOutput:
        """Edit `video` (as `prepare` takes it) towards `prompt`; see `EditSettings` for the knobs.

        `frames`, `start`, `stride`, `size` and `fps` (the output's frame rate; default the source's,
        DEFAULT_FPS for arrays and lists of frames) select and shape the frames, as in `prepare`.

        `batch_size` frames form a chunk (one keyframe each, one model call of 3 x batch_size);
        `inversion_batch_size` (default: batch_size) batches the inversion, reconstruction and decoding.
        `negative_prompt`, `guidance_scale` and `cross_attention` (the fraction of steps with
        Prompt-to-Prompt cross-attention control; `cross_reweight` multiplies the edited words'
        probabilities while it runs) default to the backbone's (SD: TokenFlow's negative
        prompt, 7.5 and 0; SANA: the empty prompt, 4.5 and 0.5), and so does `local_blend` (edit only
        where the two prompts' predictions differ, keep the source elsewhere; `sanaflow.tokenflow.blend`:
        SD 0 = off, SANA 0.5). With the blend on, `paste_source` puts the source frames' own pixels back
        outside the mask after decoding (`blend.paste_source`). `propagation` weighs the keyframes'
        propagated self-attention tokens against each frame's own attention (1 = pure TokenFlow
        propagation; default: the backbone's). `output_propagation` mixes each frame's guided prediction
        inside the edit with its keyframes' along the same correspondences, in the leading
        `output_propagation_steps` of the steps (0 = off; default: the backbone's), taken along DIS optical
        flow between the source frames (`output_correspondence="flow"`) or the attention's token matches.
        """
        settings = self.settings(
            prompt, source_prompt=source_prompt,
            negative_prompt=self.backbone.default_negative if negative_prompt is None else negative_prompt,
            guidance_scale=self.backbone.default_guidance if guidance_scale is None else guidance_scale,
            mode=mode, steps=steps, pnp_feature=pnp_feature, pnp_attention=pnp_attention,
            cross_attention=cross_attention, cross_reweight=cross_reweight, propagation=propagation,
            output_propagation=output_propagation, output_propagation_steps=output_propagation_steps,
            output_correspondence=output_correspondence, strength=strength, batch_size=batch_size, seed=seed,
            correspondence=correspondence, control_scale=control_scale, offload_keyframes=offload_keyframes,
            max_keyframes=max_keyframes, local_blend=local_blend, paste_source=paste_source,
        )
        clip = self.prepare(video, frames=frames, start=start, stride=stride, size=size, fps=fps)
        # Inversion, reconstruction and decoding have no cross-frame coupling: any batch size fits them.
        plain_batch = inversion_batch_size or batch_size
        inversion = self.invert(clip, source_prompt, steps, inversion_steps, plain_batch, reconstruct, progress,
                                inversion_refine=inversion_refine)
        run_steps = steps - settings.start_step()
        bar = _Progress(run_steps * calls_per_step(settings, clip.num_frames), "edit", progress)
        try:
            latents, masks = edit_latents(self.backbone, inversion.cache, settings, clip.frames, bar,
                                          return_masks=True)
        finally:
            bar.close()
        edited = decode_latents(self.backbone, latents, plain_batch)
        if masks is not None and settings.paste_source:
            edited = paste_source_pixels(edited, clip.frames, masks)
        return VideoEditOutput(edited, clip.frames, clip.fps, inversion)
