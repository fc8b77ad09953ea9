"""Aspect-ratio binning: map a requested size to the nearest bin of the model's base resolution.

SANA models are trained on a fixed set of (height, width) bins per base resolution (PixArt's bins,
which the reference pipeline uses). The pipeline generates at the nearest bin and resizes the
decoded image back to the requested size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError

# Bins of the 512px base, as (height, width) in units of 32 px, ordered by aspect ratio h/w.
_BINS_512 = (
    (8, 32), (8, 29), (9, 28), (9, 27), (9, 26), (10, 25), (10, 24), (11, 23), (11, 22), (11, 21),
    (12, 21), (12, 20), (13, 19), (13, 18), (14, 18), (14, 17), (15, 17), (15, 16), (16, 16),
    (16, 15), (17, 15), (17, 14), (18, 14), (18, 13), (19, 13), (20, 12), (21, 12), (22, 11),
    (23, 11), (24, 10), (25, 10), (27, 9), (32, 8),
)
# The 2048 and 4096 bins add finer steps at the extreme ratios (same units, scaled by 4 and 8).
_BINS_2048 = (
    (8, 32), (8, 31), (8, 30), (8, 29), (9, 28), (9, 27), (9, 26), (10, 25), (10, 24), (11, 23),
    (11, 22), (11, 21), (12, 21), (12, 20), (13, 19), (13, 18), (14, 18), (14, 17), (15, 17),
    (15, 16), (16, 16), (16, 15), (17, 15), (17, 14), (18, 14), (18, 13), (19, 13), (20, 12),
    (21, 12), (22, 11), (23, 11), (24, 10), (25, 10), (26, 9), (27, 9), (28, 9), (29, 8), (30, 8),
    (31, 8), (32, 8),
)


def _table(units: tuple[tuple[int, int], ...], step: int) -> dict[float, tuple[int, int]]:
    return {round(h / w, 2): (h * step, w * step) for h, w in units}


# base resolution -> {aspect ratio h/w (2 decimals): (height, width)}
ASPECT_RATIO_BINS: dict[int, dict[float, tuple[int, int]]] = {
    512: _table(_BINS_512, 32),
    1024: _table(_BINS_512, 64),
    2048: _table(_BINS_2048, 128),
    4096: _table(_BINS_2048, 256),
}


def bins_for_native(native_size: int) -> dict[float, tuple[int, int]] | None:
    """The aspect-ratio bins of a model whose native (base) size is `native_size` px, or None (e.g. 256px).

    The reference pipeline picks the table by the transformer's latent sample_size assuming a 32x
    DC-AE (16 -> 512 ... 128 -> 4096); keying by the native pixel size gives the same tables for
    every official checkpoint and stays right for models with another autoencoder.
    """
    return ASPECT_RATIO_BINS.get(int(native_size))


def nearest_bin(height: int, width: int, bins: dict[float, tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) bin whose aspect ratio is closest to height / width (first on ties)."""
    ratio = height / width
    best = min(bins, key=lambda r: abs(r - ratio))
    return bins[best]


def resize_and_center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (bilinear) so both sides cover the target, then crop the centre. (B,C,h,w) -> (B,C,H,W)."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    scale = max(height / h, width / w)
    rh, rw = int(h * scale), int(w * scale)
    images = F.interpolate(images, size=(rh, rw), mode="bilinear", align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    return images[..., top : top + height, left : left + width]


def check_size(height: int, width: int, multiple: int, max_side: int) -> None:
    """Raise InputError unless both sides are positive multiples of `multiple` and at most `max_side`."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
        if v > max_side:  # first, so the hint below never suggests a size above the limit
            raise InputError(f"{name} {v} is above the limit of {max_side} px")
        if v % multiple:
            hint = min(max(multiple, round(v / multiple) * multiple), max_side // multiple * multiple)
            raise InputError(f"{name} {v} is not a multiple of {multiple}; try {hint}")
