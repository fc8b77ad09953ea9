"""Inversion of a video into diffusion latents (DDIM for SD, flow-ODE for SANA), cached on disk.

The source video is inverted once, batched over frames, with no guidance and the source prompt.
The latent of every frame at every time of the *editing* schedule is stored in one safetensors file
beside a manifest (video hash, model, size, steps, prompt); a later edit of the same video with the
same settings finds the folder by the manifest's digest and reads one timestep at a time, so the
latents of a long video live on disk, not on the GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, InputError
from ..utils import atomic_path, atomic_write_text, dumps_json
from .backbones import Backbone, TextCond

CACHE_ENV = "SANAFLOW_CACHE"
MANIFEST = "manifest.json"
LATENTS = "latents.safetensors"
RECONSTRUCTION = "reconstruction.mp4"
RECONSTRUCTION_FRAMES = "reconstruction.safetensors"
CACHE_VERSION = 1
# Frames per VAE call, whatever the denoiser's batch: a 512 px SD VAE pass in float32 holds ~0.7 GB
# of activations per frame, so large inversion batches must not reach the VAE.
VAE_BATCH = 4

Progress = Callable[[int], None]  # called with the number of denoiser calls just done


def default_cache_dir() -> Path:
    """Where inversions are cached: $SANAFLOW_CACHE/inversions or ~/.cache/sanaflow/inversions."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "sanaflow"
    return base / "inversions"


def video_hash(frames: np.ndarray) -> str:
    """SHA-256 of the (resized) frames (T, H, W, 3) uint8 and their shape."""
    h = hashlib.sha256(str(tuple(frames.shape)).encode())
    h.update(np.ascontiguousarray(frames).data)
    return h.hexdigest()


@dataclass(frozen=True)
class InversionKey:
    """Everything an inversion depends on; its digest names the cache folder."""

    video: str
    model: str
    height: int
    width: int
    num_frames: int
    steps: int  # editing steps: latents are kept at these times
    inversion_steps: int
    prompt: str
    refine: int = 0  # fixed-point refinements per inversion step (see `invert_latents`)

    def as_dict(self) -> dict:
        """Plain dict (JSON), with the cache format version."""
        return {"version": CACHE_VERSION, **self.__dict__}

    def digest(self) -> str:
        """Short hash of the key, the cache folder's name."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:24]


class LatentCache:
    """An inversion on disk: latents (T, C, h, w) at each editing time, read one time at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"inversion cache {self.folder} has no readable {MANIFEST}: {e}") from e
        self.timesteps: list[float] = self.manifest["timesteps"]

    @staticmethod
    def folder_for(root: Path, key: InversionKey) -> Path:
        """The folder an inversion with `key` lives in under `root`."""
        return Path(root) / key.digest()

    @classmethod
    def find(cls, root: Path, key: InversionKey) -> LatentCache | None:
        """The cached inversion for `key`, or None when there is none (or it is incomplete)."""
        folder = cls.folder_for(root, key)
        if not (folder / MANIFEST).is_file() or not (folder / LATENTS).is_file():
            return None
        cache = cls(folder)
        return cache if cache.manifest.get("key") == key.as_dict() else None

    @classmethod
    def write(cls, root: Path, key: InversionKey, timesteps: list[float], latents: dict[str, torch.Tensor]) -> LatentCache:
        """Store `latents` ({'step_0000': (T, C, h, w), ..., 'clean': ...}) for `key`; return the cache."""
        from safetensors.torch import save_file

        folder = cls.folder_for(root, key)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(folder / LATENTS) as tmp:
                save_file({k: v.contiguous().cpu() for k, v in latents.items()}, str(tmp))
            manifest = {"key": key.as_dict(), "timesteps": list(timesteps)}
            atomic_write_text(folder / MANIFEST, dumps_json(manifest, indent=2))
        except OSError as e:  # a file in the way, no permission, a full disk
            raise InputError(
                f"cannot write the inversion cache {str(folder)!r}: {e.strerror or e}; choose a writable "
                f"cache folder (--cache-dir, or ${CACHE_ENV})"
            ) from e
        return cls(folder)

    def latents(self, step: int) -> torch.Tensor:
        """Latents (T, C, h, w) of all frames at editing step `step` (time ``timesteps[step]``)."""
        return self._read(step_key(step))

    def clean(self) -> torch.Tensor:
        """The encoded frames (T, C, h, w) the inversion started from."""
        return self._read("clean")

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.folder / LATENTS), framework="pt") as f:
            return f.get_tensor(name)

    @property
    def reconstruction_path(self) -> Path:
        """The reconstruction as a video to watch (written by `save_reconstruction`)."""
        return self.folder / RECONSTRUCTION

    def reconstruction(self) -> np.ndarray | None:
        """The stored reconstruction frames (T, H, W, 3) uint8, exactly as sampled, or None."""
        from safetensors.numpy import load_file

        path = self.folder / RECONSTRUCTION_FRAMES
        return load_file(str(path))["frames"] if path.is_file() else None

    def save_reconstruction(self, frames: np.ndarray, fps: float) -> None:
        """Keep the reconstruction (lossless, for reuse) and an mp4 of it (to watch; only with PyAV)."""
        from safetensors.numpy import save_file

        from ..video import has_pyav, write_video

        with atomic_path(self.folder / RECONSTRUCTION_FRAMES) as tmp:
            save_file({"frames": np.ascontiguousarray(frames)}, str(tmp))
        if has_pyav():  # the mp4 is a convenience copy; the lossless frames above are what is reused
            write_video(self.reconstruction_path, frames, fps)


def step_key(step: int) -> str:
    """Tensor name of editing step `step` in the latents file."""
    return f"step_{step:04d}"


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float (T, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_frames(images: torch.Tensor) -> np.ndarray:
    """Float images (T, 3, H, W) in [-1, 1] -> uint8 frames (T, H, W, 3)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def encode_frames(backbone: Backbone, frames: np.ndarray, batch_size: int) -> torch.Tensor:
    """VAE-encode uint8 frames (T, H, W, 3) in batches -> latents (T, C, h, w) on the CPU."""
    step = min(batch_size, VAE_BATCH)
    out = [backbone.encode(frames_to_tensor(frames[i : i + step])).cpu() for i in range(0, len(frames), step)]
    return torch.cat(out)


@torch.no_grad()
def decode_latents(backbone: Backbone, latents: torch.Tensor, batch_size: int) -> np.ndarray:
    """Decode latents (T, C, h, w) in batches -> uint8 frames (T, H, W, 3)."""
    step = min(batch_size, VAE_BATCH)
    out = [tensor_to_frames(backbone.decode(latents[i : i + step])) for i in range(0, len(latents), step)]
    return np.concatenate(out)


def inversion_schedule(backbone: Backbone, steps: int, inversion_steps: int) -> list[float]:
    """Times of the inversion, ascending: the inversion schedule merged with the editing times."""
    times = {round(float(t), 6): t for t in backbone.timesteps(inversion_steps)}
    times.update({round(float(t), 6): t for t in backbone.timesteps(steps)})
    return [times[k] for k in sorted(times)]


@torch.no_grad()
def invert_latents(
    backbone: Backbone,
    clean: torch.Tensor,
    cond: TextCond,
    steps: int,
    inversion_steps: int,
    batch_size: int,
    progress: Progress | None = None,
    refine: int = 0,
) -> dict[str, torch.Tensor]:
    """Invert latents (T, C, h, w) without guidance; return the latent at each editing time (CPU).

    Frames go through the whole inversion `batch_size` at a time, so device memory holds one batch.
    Each step first moves with the model output at the current latent x (DDIM inversion / explicit
    Euler), which is not the inverse of the sampler's step: the sampler evaluates the model at the
    *noisier* end y. `refine` > 0 fixed-point iterations y <- move(x, model(y, t), t_prev, t) then
    take the output at y instead; at the fixed point the sampler's own step from y lands on x exactly
    (Euler flow steps and epsilon-DDIM steps with a given output are inverse pairs; v-prediction
    nearly), so sampling, and the edit's source branch, retraces the inversion instead of drifting
    from the source video. One more model call each; `progress` counts calls.
    """
    if refine < 0:
        raise InputError(f"refine must be at least 0, got {refine}")
    edit_times = backbone.timesteps(steps)  # noisiest first
    slot = {round(float(t), 6): i for i, t in enumerate(edit_times)}
    times = inversion_schedule(backbone, steps, inversion_steps)
    stored: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(edit_times))}
    for start in range(0, len(clean), batch_size):
        x = clean[start : start + batch_size].to(backbone.device, torch.float32)  # (b, C, h, w)
        rows = cond.take([0] * len(x))
        t_prev = None
        for t in times:
            out = backbone.denoise(x, backbone.inversion_time(t_prev, t), rows)
            y = backbone.move(x, out, t_prev, t)  # (b, C, h, w)
            for _ in range(refine):
                y = backbone.move(x, backbone.denoise(y, t, rows), t_prev, t)  # the output taken at y, not x
            x, t_prev = y, t
            if (i := slot.get(round(float(t), 6))) is not None:
                stored[i].append(x.cpu())
            if progress is not None:
                progress(1 + refine)
    latents = {step_key(i): torch.cat(parts) for i, parts in stored.items()}
    latents["clean"] = clean.cpu()
    return latents


@torch.no_grad()
def sample_plain(
    backbone: Backbone,
    x: torch.Tensor,
    cond: TextCond,
    times: list[float],
    batch_size: int,
    uncond: TextCond | None = None,
    guidance_scale: float = 1.0,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Sample latents (T, C, h, w) from time ``times[0]`` to clean, in batches (CFG when `uncond` is given)."""
    outs = []
    for start in range(0, len(x), batch_size):
        z = x[start : start + batch_size].to(backbone.device, torch.float32)  # (b, C, h, w)
        b = len(z)
        rows = cond.take([0] * b) if uncond is None else _stack(uncond, cond, b)  # once per batch
        for i, t in enumerate(times):
            t_next = times[i + 1] if i + 1 < len(times) else None
            if uncond is None:
                out = backbone.denoise(z, t, rows).float()
            else:
                both = backbone.denoise(torch.cat([z, z]), t, rows).float()
                out = both[:b] + guidance_scale * (both[b:] - both[:b])
            z = backbone.move(z, out, t, t_next)
            if progress is not None:
                progress(1)
        outs.append(z.cpu())
    return torch.cat(outs)


def _stack(first: TextCond, second: TextCond, n: int) -> TextCond:
    hidden = torch.cat([first.hidden[:1].expand(n, -1, -1), second.hidden[:1].expand(n, -1, -1)])
    mask = None
    if first.mask is not None and second.mask is not None:
        mask = torch.cat([first.mask[:1].expand(n, -1), second.mask[:1].expand(n, -1)])
    return TextCond(hidden, mask)
