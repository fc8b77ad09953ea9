#!/usr/bin/env python
"""TokenFlow video editing: seconds per phase and peak GPU memory, random weights at real sizes (issue 6).

Timing and memory do not depend on weight values, so the models are built from configs written
here (no download) with random weights:

  sd     SD-2.1-base: UNet2DConditionModel (865M, fp16), AutoencoderKL (SD config, fp32 as the
         backbone keeps it), a CLIP ViT-H-sized text encoder (23 layers, 1024 wide, fp16) with a
         character-level tokenizer; DDIM, 512x512 frames. Needs diffusers.
  sana   the official SANA-600M transformer config and the SANA-1.0 DC-AE (f32c32, 312M), bf16,
         1024x1024 frames; the caption encoder is a stand-in that returns fixed random embeddings of
         the Gemma-2-2B size (300 tokens x 2304), so its cost (one call per edit) is not measured.

Cases (``--cases``, comma-separated names or fnmatch patterns; each fits one 10-minute command):

  sd-public-40 / -120   the public implementation's defaults: 500 DDIM inversion steps (latents kept
                        on the 50-step editing schedule), inversion batch 40, reconstruction, 50 edit
                        steps, batch 8, guidance 7.5, PnP 0.8 / 0.5, 40 / 120 frames. Two
                        reconstructions are timed: ours (on the editing schedule, what `--reconstruct`
                        does) and the public code's (back over the whole 500-step schedule), giving
                        ``e2e_s`` (our pipeline) and ``e2e_matched_s`` (the same work as the public code).
  sd-fast-40/-120/-200  the documented fast default: inversion on the editing schedule (50 steps), no
                        reconstruction; -200 gives the 200-frame peak memory.
  sd-cli-40             ``sanaflow edit`` in a fresh process at the public defaults, wall clock from
                        the shell (import, model load from a saved folder, video read and write
                        included), as the public code's end-to-end figure is measured.
  sd-unet-step          one UNet call on the inversion batch (40 frames) eager, channels_last,
                        + cudnn.benchmark, + torch.compile: per-call seconds and the projected
                        500-step inversion (which variant to ship).
  sana600m-40           SANA-600M + DC-AE f32c32 at 1024x1024, 40 frames, fast default.

Impls (``--impl``): ``ours`` (the library as shipped), ``ours-tuned`` (+ channels_last UNet/VAE and
cudnn.benchmark), ``ours-compile`` (tuned + torch.compile of the UNet for the plain passes).

Every case first runs a 2-step warm-up of the same pipeline on the same frames (cuDNN / cuBLAS
initialisation, autotuning and compilation happen there; its seconds are recorded as
``warmup_s``), then the timed phases, each bracketed by ``torch.cuda.synchronize``, with
``torch.cuda.max_memory_allocated`` reset per phase (weights included). A case that fails (OOM, ...)
is recorded with its ``error`` and the run goes on. Records are merged into ``--out`` (default
benchmarks/results/tokenflow_speed.json; the same (case, impl) replaces) and written atomically
after every case. ``--smoke`` runs every case at toy sizes (CPU is fine, < 1 minute) into a temp file.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    CAPTION_TOKENS,
    DC_AE_F32C32,
    SANA_600M,
    TINY_DCAE,
    TINY_SANA,
    add_out_argument,
    fill_defaults,
    merge_records,
)

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("sanaflow") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "tokenflow_speed.json"
SMOKE_OUT = Path(tempfile.gettempdir()) / "tokenflow_speed_smoke.json"

SOURCE_PROMPT = "a woman running in a park"
TARGET_PROMPT = "a marble statue running in a park"

# The public implementation (omerbt/TokenFlow) at its defaults, measured on an NVIDIA H100 80GB HBM3
# with diffusers 0.42.1 / torch 2.11 on 2026-11-27 (/work/shared/BENCHMARKS.md). Compare only on
# the same GPU type.
PUBLIC_H100 = {
    40: {"inversion_s": 59.9, "reconstruction_s": 58.2, "edit_s": 44.9, "edit_step_s": 0.87, "e2e_s": 254.0,
         "peak_gib": 8.7},
    120: {"inversion_s": 176.4, "reconstruction_s": 175.8, "edit_s": 216.2, "edit_step_s": 4.27, "e2e_s": 705.0,
          "peak_gib": 11.6},
}

# ------------------------------------------------------------------------------------------------
# Model configs (diffusers / sanaflow constructor keys)
# ------------------------------------------------------------------------------------------------

# stabilityai/stable-diffusion-2-1-base unet/config.json (attention_head_dim holds the head counts)
SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True, dual_cross_attention=False,
)
# its vae/config.json
SD_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
# its text_encoder/config.json (OpenCLIP ViT-H/14 text tower); bos/eos are the toy tokenizer's ids
CLIP_H_TEXT = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512, bos_token_id=514, eos_token_id=515,
)
# its scheduler/scheduler_config.json (DDIM, epsilon prediction)
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
TOKENIZER_MAX_LENGTH = 77

# SANA-600M and the SANA-1.0 DC-AE f32c32 (and their toy versions) come from _common; their scheduler:
SANA_SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True,
                  "prediction_type": "flow_prediction", "flow_shift": 3.0, "num_train_timesteps": 1000}

# --smoke: the same code paths at toy sizes
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
    layers_per_block=1,
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=516,
                 max_position_embeddings=77, projection_dim=32, bos_token_id=514, eos_token_id=515)


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    backbone: str  # "sd" or "sana"
    frames: int
    inversion_steps: int | None  # None: the editing schedule itself (the fast default)
    reconstruct: bool  # our reconstruction (on the editing schedule)
    full_reconstruction: bool  # the public code's reconstruction (over the whole inversion schedule)
    steps: int = 50
    px: int = 512
    batch_size: int = 8
    inversion_batch: int = 40  # the public code's preprocess batch
    runner: str = "phases"  # "phases" (in-process pipeline), "cli" (`sanaflow edit` subprocess), "unet"
    description: str = ""


CASES = {
    "sd-public-40": Case("sd", 40, 500, True, True, description="public defaults, 40 frames"),
    "sd-public-120": Case("sd", 120, 500, True, True, description="public defaults, 120 frames"),
    "sd-fast-40": Case("sd", 40, None, False, False, description="fast default, 40 frames"),
    "sd-fast-120": Case("sd", 120, None, False, False, description="fast default, 120 frames"),
    "sd-fast-200": Case("sd", 200, None, False, False, description="fast default, 200 frames (memory)"),
    "sd-cli-40": Case("sd", 40, 500, True, False, runner="cli",
                      description="`sanaflow edit` subprocess at public defaults, wall clock"),
    "sd-unet-step": Case("sd", 40, 500, False, False, runner="unet",
                         description="one UNet call on an inversion batch of 40 frames, per variant"),
    "sana600m-40": Case("sana", 40, None, False, False, px=1024,
                        description="SANA-600M + DC-AE f32c32, 1024 px, fast default"),
}
IMPLS = ("ours", "ours-tuned", "ours-compile")


def smoke_case(case: Case) -> Case:
    """The same case at toy sizes: a few frames and steps, 32 px frames, several chunks and keyframes."""
    frames = {40: 4, 120: 5, 200: 6}[case.frames]
    return replace(case, frames=frames, steps=2, inversion_steps=None if case.inversion_steps is None else 4,
                   px=32, batch_size=2, inversion_batch=4)


# ------------------------------------------------------------------------------------------------
# Building the backbones
# ------------------------------------------------------------------------------------------------


def write_char_tokenizer(folder: Path, max_length: int) -> Any:
    """A CLIP tokenizer with a character-level vocabulary (ids < 516) and no merges, saved to `folder`."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    # Byte-to-unicode table of GPT-2 / CLIP: printable bytes are themselves, the others map above 255.
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        chars.append(chr(b) if b in keep else chr(256 + extra))
        extra += b not in keep
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)  # 514
    vocab["<|endoftext|>"] = len(vocab)  # 515
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)
    return tok


def build_sd(device: torch.device, smoke: bool, workdir: Path):
    """SD-2.1-base-sized backbone with random weights (built directly on the device)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sanaflow.tokenflow import StableDiffusionBackbone

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if smoke else SD21_UNET))
        vae = AutoencoderKL(**(TINY_VAE if smoke else SD_VAE))
        text = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT if smoke else CLIP_H_TEXT)))
    # .to(device) too: a buffer made from numpy during construction would otherwise stay on the CPU
    unet.to(device, dtype).eval().requires_grad_(False)
    vae.to(device, torch.float32).eval().requires_grad_(False)  # as StableDiffusionBackbone.from_pretrained keeps it
    text.to(device, dtype).eval().requires_grad_(False)
    tokenizer = write_char_tokenizer(workdir / "tokenizer", TOKENIZER_MAX_LENGTH)
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    return StableDiffusionBackbone(unet, vae, text, tokenizer, scheduler, name="sd-2.1-base-sized-random")


def save_sd_folder(backbone, folder: Path) -> Path:
    """Write the backbone's parts as a diffusers SD folder (for the CLI case)."""
    backbone.unet.save_pretrained(folder / "unet")
    backbone.vae.save_pretrained(folder / "vae")
    backbone.text_encoder.save_pretrained(folder / "text_encoder")
    backbone.tokenizer.save_pretrained(folder / "tokenizer")
    backbone.scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


class RandomCaptions:
    """Stand-in caption encoder: fixed random embeddings (P, tokens, channels), every token valid."""

    def __init__(self, channels: int, tokens: int, dtype: torch.dtype):
        self.channels, self.tokens, self.dtype = channels, tokens, dtype

    def encode(self, prompts, device=None):
        """(hidden (P, L, C), mask (P, L)) for `prompts`, the same for the same prompt."""
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(map(ord, p)))
            rows.append(torch.randn(self.tokens, self.channels, generator=g))
        hidden = torch.stack(rows).to(device, self.dtype)  # (P, L, C)
        return hidden, torch.ones(hidden.shape[:2], dtype=torch.long, device=device)


def build_sana(device: torch.device, smoke: bool):
    """SANA-600M-sized backbone with the SANA-1.0 DC-AE, random weights."""
    from sanaflow.models import DCAE, SanaTransformer
    from sanaflow.tokenflow import SanaBackbone

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        transformer = SanaTransformer(**(TINY_SANA if smoke else SANA_600M))
        vae = DCAE(**(TINY_DCAE if smoke else DC_AE_F32C32))
    transformer.to(device, dtype).eval().requires_grad_(False)  # (see build_sd)
    vae.to(device, dtype).eval().requires_grad_(False)
    caption = (TINY_SANA if smoke else SANA_600M)["caption_channels"]
    captions = RandomCaptions(caption, 16 if smoke else CAPTION_TOKENS, dtype)
    return SanaBackbone(transformer, vae, captions, SANA_SCHEDULER, name="sana-600m-sized-random")


def tune(backbone, impl: str, compile_mode: str | None) -> str:
    """Apply the impl's options to a built backbone; return a note saying what was done."""
    from sanaflow.tokenflow import StableDiffusionBackbone

    notes = []
    sd = isinstance(backbone, StableDiffusionBackbone)
    if impl in ("ours-tuned", "ours-compile"):
        torch.backends.cudnn.benchmark = True
        notes.append("cudnn.benchmark")
        if sd:  # convolution-heavy; SANA's transformer is token-major
            backbone.unet.to(memory_format=torch.channels_last)
            backbone.vae.to(memory_format=torch.channels_last)
            notes.append("UNet and VAE channels_last")
    if impl == "ours-compile":
        if not sd:
            raise RuntimeError(f"{type(backbone).__name__} has no compile option (SD only)")
        backbone.compile(**({} if compile_mode is None else {"mode": compile_mode}))
        notes.append(f"torch.compile of the UNet for inversion/reconstruction (mode {compile_mode or 'default'})")
    return ", ".join(notes) or "as shipped"


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


def synthetic_video(frames: int, px: int) -> np.ndarray:
    """A smooth random texture panning and a bright square moving across it: (T, px, px, 3) uint8."""
    rng = np.random.default_rng(0)
    base = rng.random((px // 8 + 1, px // 8 + 1, 3)).astype(np.float32)
    base = np.kron(base, np.ones((8, 8, 1), np.float32))[:px, :px]  # blocky, then panned below
    out = np.empty((frames, px, px, 3), np.uint8)
    side = max(2, px // 6)
    for t in range(frames):
        f = np.roll(base, shift=(t % px, (2 * t) % px), axis=(0, 1))
        x = (t * 3) % max(1, px - side)
        f[px // 3 : px // 3 + side, x : x + side] = 1.0
        out[t] = (f * 255).astype(np.uint8)
    return out


class Phases:
    """Times phases (synchronised) and their peak allocated memory."""

    def __init__(self, device: torch.device, save: Callable[[], None]):
        self.device = device
        self.save = save  # called after every phase, so a run killed mid-case keeps what it measured
        self.results: dict[str, dict[str, float | None]] = {}

    def sync(self) -> None:
        """Wait for the device."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run fn as phase `name`; print and keep seconds and peak GiB."""
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        self.results[name] = {"seconds": round(seconds, 3), "peak_gib": None if peak is None else round(peak, 3)}
        print(f"    {name:22s} {seconds:9.2f} s" + ("" if peak is None else f"   peak {peak:6.2f} GiB"), flush=True)
        self.save()
        return out


def video_io_available() -> bool:
    """Whether mp4 files can be written here (PyAV)."""
    return importlib.util.find_spec("av") is not None


def run_phases(name: str, case: Case, impl: str, args, rec: dict[str, Any], workdir: Path,
               save: Callable[[], None]) -> None:
    """Build the backbone, warm up, then time every phase of one edit; fill `rec`."""
    from sanaflow.pipelines.video_edit import VideoEditPipeline
    from sanaflow.tokenflow import EditSettings, edit_latents
    from sanaflow.tokenflow.inversion import decode_latents, inversion_schedule, sample_plain
    from sanaflow.video import VideoClip, read_video, write_video

    device = torch.device(args.device)
    t0 = time.perf_counter()
    backbone = build_sana(device, args.smoke) if case.backbone == "sana" else build_sd(device, args.smoke, workdir)
    rec["notes"].append(tune(backbone, impl, args.compile_mode))
    phases = Phases(device, save)
    rec["phases"] = phases.results  # filled as the phases finish
    phases.sync()
    rec["build_s"] = round(time.perf_counter() - t0, 2)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        rec["weights_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 3)
    frames = synthetic_video(case.frames, case.px)
    io = video_io_available()
    source_path = workdir / "source.mp4"
    if io:
        write_video(source_path, frames, 10.0)
    else:
        rec["notes"].append("no PyAV: video read/write not timed")
    pipe = VideoEditPipeline(backbone, cache_dir=workdir / "cache")
    settings = EditSettings(prompt=TARGET_PROMPT, source_prompt=SOURCE_PROMPT, steps=case.steps,
                            batch_size=case.batch_size, guidance_scale=7.5, pnp_feature=0.8, pnp_attention=0.5, seed=1)
    common = dict(source_prompt=SOURCE_PROMPT, batch_size=case.batch_size, inversion_batch_size=case.inversion_batch,
                  size=case.px, progress=False)

    # Warm-up: the same shapes through every phase, 2 steps (cuDNN autotuning, compilation, lazy init).
    # The pipeline keeps its reconstruction as an mp4 beside the cache, so without PyAV the warm-up
    # leaves it out (the timed reconstruction below calls the sampler directly and writes nothing).
    phases.run("warmup", lambda: pipe(VideoClip(frames, 10.0), TARGET_PROMPT, steps=2, inversion_steps=2,
                                      reconstruct=case.reconstruct and io, **common))
    rec["warmup_s"] = phases.results.pop("warmup")["seconds"]

    def read() -> VideoClip:
        clip = read_video(source_path) if io else VideoClip(frames, 10.0)
        return pipe.prepare(clip, size=case.px)

    clip = phases.run("read", read)
    inversion = phases.run("inversion", lambda: pipe.invert(
        clip, SOURCE_PROMPT, case.steps, case.inversion_steps, case.inversion_batch, reconstruct=False, progress=False))
    if case.reconstruct:
        phases.run("reconstruction", lambda: pipe.reconstruct(inversion.cache, SOURCE_PROMPT, case.inversion_batch,
                                                              progress=False))
    latents = phases.run("edit", lambda: edit_latents(backbone, inversion.cache, settings, clip.frames))
    edited = phases.run("decode", lambda: decode_latents(backbone, latents, case.inversion_batch))
    if io:
        phases.run("write", lambda: write_video(workdir / "edited.mp4", edited, clip.fps))
    p = phases.results
    core = ["read", "inversion", "edit", "decode"] + (["write"] if io else [])
    rec["e2e_s"] = round(sum(p[k]["seconds"] for k in core + (["reconstruction"] if case.reconstruct else [])), 3)
    rec["edit_step_s"] = round(p["edit"]["seconds"] / case.steps, 4)
    rec["keyframes"] = -(-case.frames // case.batch_size)

    def peak() -> float | None:
        peaks = [v["peak_gib"] for v in p.values() if v["peak_gib"] is not None]
        return max(peaks) if peaks else None

    rec["peak_gib"] = peak()
    save()
    if case.full_reconstruction:
        # Last, so a run cut by a time limit still has every figure of our pipeline. The public code
        # samples back over the whole inversion schedule; the cost is that of len(times) model calls
        # per batch whatever the start latent, so the latent of the first editing time stands in for
        # the fully inverted one.
        def full() -> np.ndarray:
            times = inversion_schedule(backbone, case.steps, case.inversion_steps or case.steps)[::-1]
            z = sample_plain(backbone, inversion.cache.latents(0), backbone.embed([SOURCE_PROMPT]), times,
                             case.inversion_batch)
            return decode_latents(backbone, z, case.inversion_batch)

        phases.run("reconstruction_full", full)
        rec["e2e_matched_s"] = round(sum(p[k]["seconds"] for k in core + ["reconstruction_full"]), 3)
        rec["peak_gib"] = peak()


def run_cli(name: str, case: Case, impl: str, args, rec: dict[str, Any], workdir: Path,
            save: Callable[[], None]) -> None:
    """Time `sanaflow edit` in a fresh process from a saved random-weight folder (wall clock)."""
    from sanaflow.video import write_video

    if impl != "ours":
        raise RuntimeError("the CLI case runs the library as shipped: use --impl ours")
    if not video_io_available():
        raise RuntimeError("the CLI case needs PyAV to read and write mp4")
    device = torch.device(args.device)
    backbone = build_sd(device, args.smoke, workdir)
    model = save_sd_folder(backbone, workdir / "model")
    del backbone
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    source = write_video(workdir / "source.mp4", synthetic_video(case.frames, case.px), 10.0)
    cmd = [sys.executable, "-m", "sanaflow.cli", "edit", str(source), "--model", str(model), "--prompt", TARGET_PROMPT,
           "--source-prompt", SOURCE_PROMPT, "--steps", str(case.steps), "--batch-size", str(case.batch_size),
           "--inversion-batch-size", str(case.inversion_batch), "--cfg", "7.5", "--device", args.device,
           "--size", str(case.px), "--cache-dir", str(workdir / "cache"), "--out", str(workdir / "edited.mp4"),
           "--quiet"]
    if case.inversion_steps is not None:
        cmd += ["--inversion-steps", str(case.inversion_steps)]
    if case.reconstruct:
        cmd.append("--reconstruct")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"sanaflow edit exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    rec["e2e_s"] = round(seconds, 3)
    rec["cli"] = " ".join(cmd[1:])
    rec["notes"].append("wall clock of a fresh process: import, model load, video read/write included")
    print(f"    {'sanaflow edit (wall)':22s} {seconds:9.2f} s", flush=True)


def run_unet(name: str, case: Case, impl: str, args, rec: dict[str, Any], workdir: Path,
             save: Callable[[], None]) -> None:
    """Seconds of one UNet call on an inversion batch, eager / channels_last / cudnn.benchmark / compiled."""
    device = torch.device(args.device)
    backbone = build_sd(device, args.smoke, workdir)
    latent = case.px // backbone.multiple
    x = torch.randn(case.inversion_batch, 4, latent, latent, device=device)  # (B, 4, h, w)
    cond = backbone.embed([SOURCE_PROMPT]).take([0] * case.inversion_batch)
    t = backbone.timesteps(case.steps)[case.steps // 2]
    runs = 2 if args.smoke else 10
    rec["variants"] = {}

    def variant(label: str) -> None:
        for _ in range(2 if args.smoke else 3):  # warm-up (compilation, autotuning)
            backbone.denoise(x, t, cond)
        times = []
        for _ in range(runs):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                backbone.denoise(x, t, cond)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                backbone.denoise(x, t, cond)
                times.append(time.perf_counter() - t0)
        seconds = float(np.median(times))
        steps = case.inversion_steps or case.steps
        rec["variants"][label] = {
            "seconds": round(seconds, 5), "ms_per_frame": round(1e3 * seconds / case.inversion_batch, 3),
            # 500 inversion steps over `frames` frames in batches of inversion_batch, from this call
            "projected_inversion_s": round(seconds * steps * -(-case.frames // case.inversion_batch), 2),
        }
        print(f"    {label:34s} {seconds * 1e3:9.2f} ms / call of {case.inversion_batch}", flush=True)
        save()

    variant("eager")
    backbone.unet.to(memory_format=torch.channels_last)
    variant("channels_last")
    torch.backends.cudnn.benchmark = True
    variant("channels_last+cudnn.benchmark")
    # On the CPU (smoke) dynamo traces without code generation: inductor there needs a C++ toolchain.
    cpu = device.type == "cpu"
    options = {"backend": "eager"} if cpu else {"mode": args.compile_mode} if args.compile_mode else {}
    backbone.compile(**options)
    mode = "eager backend" if cpu else args.compile_mode or "default"
    variant(f"compile({mode})+channels_last+cudnn.benchmark")


def compare_public(case: Case, rec: dict[str, Any]) -> None:
    """Ratios to the public implementation's H100 figures (meaningful on an H100 only)."""
    ref = PUBLIC_H100.get(case.frames)
    if ref is None or rec.get("variants"):
        rec["vs_public"] = None if ref is None else {
            label: round(ref["inversion_s"] / v["projected_inversion_s"], 2)
            for label, v in rec.get("variants", {}).items()
        }  # projected inversion speedups of the UNet-step variants
        return
    if case.inversion_steps != 500 or rec.get("e2e_s") is None:
        return
    out = {"gpu": "NVIDIA H100 80GB HBM3", "public": ref}
    if rec.get("phases"):
        p = rec["phases"]
        out["inversion_speedup"] = round(ref["inversion_s"] / p["inversion"]["seconds"], 2)
        out["edit_speedup"] = round(ref["edit_s"] / p["edit"]["seconds"], 2)
        if "reconstruction_full" in p:
            out["reconstruction_full_speedup"] = round(ref["reconstruction_s"] / p["reconstruction_full"]["seconds"], 2)
        if rec.get("e2e_matched_s"):
            out["e2e_matched_speedup"] = round(ref["e2e_s"] / rec["e2e_matched_s"], 2)
    out["e2e_speedup"] = round(ref["e2e_s"] / rec["e2e_s"], 2)
    rec["vs_public"] = out


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------


RUNNERS = {"phases": run_phases, "cli": run_cli, "unet": run_unet}


def versions(device: torch.device) -> dict[str, Any]:
    """GPU name, library versions and the checkout's commit, written into every record."""
    import importlib.metadata

    try:
        diffusers = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        diffusers = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "diffusers": diffusers, "commit": commit}


def write_records(out: Path, records: list[dict[str, Any]], fresh: bool) -> None:
    """Merge `records` into `out` (same (case, impl) replaces) and write it atomically."""
    merge_records(out, records, lambda r: (r.get("case"), r.get("impl")), fresh)


def measure_case(name: str, case: Case, impl: str, args, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Run one case and append its record to `records` (written after every phase); a failure becomes `error`."""
    rec: dict[str, Any] = {
        "case": name, "impl": impl, "description": case.description, "settings": asdict(case),
        "smoke": args.smoke, **meta, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "notes": [], "error": None,
    }
    if case.backbone == "sana":
        rec["notes"].append("caption encoder: fixed random 2304-dim embeddings (300 tokens), not timed")
    records.append(rec)

    def save() -> None:
        write_records(args.out, records, args.fresh)

    print(f"== {name} [{impl}]: {case.description}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_tokenflow_") as tmp:
        try:
            with torch.inference_mode():
                RUNNERS[case.runner](name, case, impl, args, rec, Path(tmp), save)
            compare_public(case, rec)
        except Exception as e:  # OOM, missing package, ...: record it and go on with the next case
            text = str(e).strip().splitlines()
            rec["error"] = f"{type(e).__name__}: {text[0][:400] if text else ''}"
            print(f"    ERROR {rec['error']}", flush=True)
            if args.verbose:
                traceback.print_exc()
        finally:
            torch.backends.cudnn.benchmark = False
            torch._dynamo.reset()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    summary = ", ".join(f"{k} {rec[k]}" for k in ("e2e_s", "e2e_matched_s", "edit_step_s", "peak_gib") if k in rec)
    if summary:
        print(f"    -> {summary}", flush=True)
    save()


def select(patterns: str | None) -> list[str]:
    """Case names matching comma-separated names / fnmatch patterns (None: all)."""
    if patterns is None:
        return list(CASES)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    names = [n for n in CASES if any(fnmatch.fnmatch(n, p) for p in wanted)]
    unknown = [p for p in wanted if not any(fnmatch.fnmatch(n, p) for n in CASES)]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choose from: {', '.join(CASES)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--cases", default=None, help=f"comma-separated cases or patterns (default: all): {', '.join(CASES)}")
    p.add_argument("--impl", default="ours", choices=IMPLS, help="what runs (default: ours, the library as shipped)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for --impl ours-compile (default: default)")
    p.add_argument("--smoke", action="store_true", help="toy sizes, CPU-able: checks the script")
    add_out_argument(p, DEFAULT_OUT, SMOKE_OUT)
    p.add_argument("--fresh", action="store_true", help="overwrite --out instead of merging into it")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing cases")
    return fill_defaults(p.parse_args(argv), DEFAULT_OUT, SMOKE_OUT)


def main(argv: list[str] | None = None) -> int:
    """Run the selected cases, writing the results after each."""
    args = parse_args(argv)
    names = select(args.cases)
    device = torch.device(args.device)
    if not args.smoke and device.type != "cuda":
        raise SystemExit("real-size cases need a CUDA GPU; use --smoke to check the script on the CPU")
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # toy ops gain nothing from threads; contention only slows them
    with contextlib.suppress(ImportError):  # its casting notices would drown the progress lines
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    meta = versions(device)
    print(f"device {meta['gpu']}, torch {meta['torch']}, diffusers {meta['diffusers']}, impl {args.impl}, "
          f"cases {', '.join(names)}", flush=True)
    records = []
    for name in names:
        case = smoke_case(CASES[name]) if args.smoke else CASES[name]
        measure_case(name, case, args.impl, args, meta, records)
    print(f"wrote {len(records)} records to {args.out}", flush=True)
    return 0 if all(r["error"] is None for r in records) else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
