"""Regenerate examples/shapes_clip.mp4: a small procedural clip for `sanaflow edit` on a fresh machine.

A red disc rolls right and a blue square drifts left over a soft gradient, 24 frames of 128x128 at
12 fps. Try:  sanaflow edit examples/shapes_clip.mp4 --prompt "a green disc and a blue square"
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sanaflow.video import write_video


def make_clip(frames: int = 24, size: int = 128) -> np.ndarray:
    """Frames (T, size, size, 3) uint8 of the example scene."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    background = np.stack([200 - 60 * ys / size, 190 + 0 * xs, 120 + 100 * xs / size], axis=-1)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        img = background.copy()
        cx, cy = 24 + 3.2 * t, 44 + 6 * np.sin(t / 4)
        img[(xs - cx) ** 2 + (ys - cy) ** 2 <= 15**2] = (220, 40, 40)
        sx, sy = 96 - 2.0 * t, 88
        img[(abs(xs - sx) <= 12) & (abs(ys - sy) <= 12)] = (40, 70, 210)
        out[t] = img.clip(0, 255).astype(np.uint8)
    return out


if __name__ == "__main__":
    path = write_video(Path(__file__).with_name("shapes_clip.mp4"), make_clip(), fps=12)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
