"""Local blending: edit only where the two prompts disagree, keep the source video everywhere else.

TokenFlow's PnP injection preserves the source's *layout*, but every latent is still regenerated:
objects the prompt does not touch drift and soften, and a shape edit fights the injected structure.
Local blending (as in Blended Latent Diffusion and Prompt-to-Prompt's local blend) keeps, after every
editing step, the source trajectory's latent outside a per-frame edit mask:

    x_next <- m * x_next + (1 - m) * source_next

where `source_next` is the inverted source latent at the next time of the schedule (the clean
encoded frame after the last step), so outside the mask the result is the source video itself.

The mask comes from the model, with no user input, as in DiffEdit (Couairon et al. 2022): on the
inverted source latents at a few mid-schedule times, the velocity (or noise) predicted for the
target prompt differs from the one for the source prompt where the edit has to change the frame.
The per-frame difference, averaged over channels and times, smoothed and scaled to its frame's
maximum, is thresholded and grown by a margin of latent pixels (the edited object may be larger
than the source one, e.g. a square replacing a triangle).

After decoding, `paste_source` can put the source video's own pixels back outside the mask (as
Blended Latent Diffusion's final pixel blend): the decoded latent there is the autoencoder's
reconstruction of the source, close to it but not equal, and untouched objects then keep their exact
outlines. The latent mask is grown by one more latent pixel and upsampled bilinearly, so the seam
is a ramp one latent pixel wide, a latent pixel outside the blend's own mask.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .backbones import Backbone, TextCond
from .inversion import LatentCache

# Latent pixels the mask is grown by before the source pixels are pasted back (`paste_source`): on the
# shapes validation videos, without it a shape edit lost a frame whose new outline reached past the mask.
PASTE_GROW = 1
# Fractions of the editing schedule (0 = noisiest step) at which the mask is measured.
MASK_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7)


def mask_steps(steps: int, levels: tuple[float, ...] = MASK_LEVELS) -> list[int]:
    """Distinct step indices of a `steps`-step schedule at the fractions `levels`."""
    return sorted({min(steps - 1, max(0, int(round(f * (steps - 1))))) for f in levels})


@torch.no_grad()
def difference_maps(
    backbone: Backbone,
    cache: LatentCache,
    conds: TextCond,
    batch_size: int,
    levels: tuple[float, ...] = MASK_LEVELS,
) -> torch.Tensor:
    """(T, h, w) float32: mean |output(target) - output(source)| over channels and `levels`, per latent pixel.

    `conds` holds two prompts, [source, target]; the model sees the inverted source latents.
    """
    steps = len(cache.timesteps)
    total = None
    for j in mask_steps(steps, levels):
        x = cache.latents(j)  # (T, C, h, w)
        t = cache.timesteps[j]
        parts = []
        for start in range(0, len(x), batch_size):
            z = x[start : start + batch_size].to(backbone.device, torch.float32)
            n = len(z)
            out = backbone.denoise(torch.cat([z, z]), t, conds.take([0] * n + [1] * n)).float()
            parts.append((out[n:] - out[:n]).abs().mean(dim=1).cpu())  # (n, h, w)
        d = torch.cat(parts)
        total = d if total is None else total + d
    return total / len(mask_steps(steps, levels))


def masks_from_differences(diff: torch.Tensor, threshold: float, grow: int = 1) -> torch.Tensor:
    """Binary edit masks (T, 1, h, w) float32 from difference maps (T, h, w).

    Each frame's map is smoothed (3 x 3 mean), divided by its maximum, thresholded at `threshold`
    and dilated by `grow` latent pixels.
    """
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"--local-blend threshold must lie in (0, 1), got {threshold}")
    d = F.avg_pool2d(diff[:, None].float(), 3, stride=1, padding=1, count_include_pad=False)  # (T, 1, h, w)
    d = d / d.amax(dim=(2, 3), keepdim=True).clamp(min=1e-12)
    m = (d >= threshold).float()
    if grow > 0:
        m = F.max_pool2d(m, 2 * grow + 1, stride=1, padding=grow)
    return m


def edit_masks(backbone: Backbone, cache: LatentCache, source_prompt: str, prompt: str, threshold: float,
               batch_size: int, grow: int = 1) -> torch.Tensor:
    """Edit masks (T, 1, h, w) for editing the cached video from `source_prompt` to `prompt`."""
    conds = backbone.embed([source_prompt, prompt])
    return masks_from_differences(difference_maps(backbone, cache, conds, batch_size), threshold, grow)


def blend(edited: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask * edited + (1 - mask) * source (all (T, C, h, w) or broadcastable)."""
    return torch.lerp(source, edited, mask)


def paste_source(edited: np.ndarray, source: np.ndarray, masks: torch.Tensor, grow: int = PASTE_GROW) -> np.ndarray:
    """Frames (T, H, W, 3) uint8: `edited` inside the edit `masks` (T, 1, h, w), `source` outside.

    `edited` and `source` must have the same shape. The mask is first grown by `grow` latent pixels
    (the decoded edit may reach a little past the latent mask: a new shape's corners), then upsampled
    bilinearly to (H, W).
    """
    if edited.shape != source.shape or edited.ndim != 4:
        raise ConfigError(f"paste_source: edited frames {edited.shape} and source frames {source.shape} differ")
    T, H, W, _ = edited.shape
    if masks.dim() != 4 or masks.shape[0] != T or masks.shape[1] != 1:
        raise ConfigError(f"paste_source: masks must be (T={T}, 1, h, w); got {tuple(masks.shape)}")
    m = masks.float().cpu()
    if grow > 0:
        m = F.max_pool2d(m, 2 * grow + 1, stride=1, padding=grow)
    out = np.empty_like(edited)
    for t in range(T):  # a frame at a time: float copies of a long video would not fit in memory
        mt = F.interpolate(m[t : t + 1], size=(H, W), mode="bilinear", align_corners=False)
        mt = mt.clamp(0.0, 1.0)[0, 0, :, :, None].numpy()  # (H, W, 1)
        frame = mt * edited[t].astype(np.float32) + (1.0 - mt) * source[t].astype(np.float32)
        out[t] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return out
