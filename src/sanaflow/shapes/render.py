"""Anti-aliased rendering of scenes with OpenCV: filled polygons at 1/16-pixel precision with LINE_AA.

About 10k scenes/s at 256 px on one core (benchmarks/bench_shapes.py), so the CPU feeds a GPU
trainer; `render_batch` writes into one preallocated array for a whole batch.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from ..errors import InputError
from ..utils import is_int
from .scene import BACKGROUNDS, PALETTE, SIZES, Scene, ShapeObject, check_scene

MAX_SIDE = 8192  # largest image side rendered (also the cap on shapes videos)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(length: float, half_width: float) -> np.ndarray:
    L, h = length, half_width
    return np.array(
        [
            (-h, -L),
            (h, -L),
            (h, -h),
            (L, -h),
            (L, h),
            (h, h),
            (h, L),
            (-h, L),
            (-h, h),
            (-L, h),
            (-L, -h),
            (-h, -h),
        ],
        dtype=np.float64,
    )


# Unit outlines (scale 1, y pointing down, the apex of triangle and star pointing up). Their areas
# are roughly equal (circle pi, square 2.9, triangle 2.0, star 2.3, cross 2.6), so one size name
# looks about as big on every shape.
UNIT_OUTLINES: dict[str, np.ndarray] = {
    "square": np.array([(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)], dtype=np.float64),
    "triangle": _star(3, 1.25, 1.25)[::2],
    "star": _star(5, 1.25, 0.625),
    "cross": _cross(1.05, 0.38),
}


def _polygon_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


UNIT_AREAS: dict[str, float] = {"circle": math.pi, **{k: _polygon_area(v) for k, v in UNIT_OUTLINES.items()}}

_SHIFT = 4  # OpenCV fixed-point coordinates: 4 fractional bits = 1/16 pixel
_ONE = 1 << _SHIFT


def outline(obj: ShapeObject, height: int, width: int, scale: float = 1.0) -> np.ndarray:
    """The object's polygon in pixel coordinates (float64, (N, 2)); circles have none (use `draw_object`)."""
    s = SIZES[obj.size] * min(height, width) * scale
    t = math.radians(obj.rotation)
    c, si = math.cos(t), math.sin(t)
    # Row vectors times `rot` turn by `rotation` degrees (clockwise on screen, where y points down).
    rot = np.array([[c, si], [-si, c]]) * s
    # Pixel centres sit at integer coordinates, so the image spans [-0.5, W - 0.5].
    return UNIT_OUTLINES[obj.shape] @ rot + (obj.x * width - 0.5, obj.y * height - 0.5)


def draw_object(
    img: np.ndarray,
    obj: ShapeObject,
    color,
    scale: float = 1.0,
    antialias: bool = True,
    centre=None,
    rotation=None,
) -> None:
    """Draw one object into `img` (H, W, C) in place; `centre`/`rotation`/`scale` override the object's own."""
    h, w = img.shape[:2]
    if centre is not None or rotation is not None:
        x, y = centre if centre is not None else (obj.x, obj.y)
        obj = ShapeObject(
            obj.shape, obj.color, obj.size, x, y, obj.rotation if rotation is None else rotation
        )
    line = cv2.LINE_AA if antialias else cv2.LINE_8
    if obj.shape == "circle":
        r = SIZES[obj.size] * min(h, w) * scale
        centre_px = (round((obj.x * w - 0.5) * _ONE), round((obj.y * h - 0.5) * _ONE))
        cv2.circle(img, centre_px, max(1, round(r * _ONE)), color, -1, line, _SHIFT)
    else:
        pts = np.round(outline(obj, h, w, scale) * _ONE).astype(np.int32)
        cv2.fillPoly(img, [pts], color, line, _SHIFT)


def size_hw(size, what: str = "image") -> tuple[int, int]:
    """`size` (an int, or (height, width) ints) -> (h, w), each side in [16, MAX_SIDE]; InputError otherwise."""
    if is_int(size):
        h = w = int(size)
    elif isinstance(size, tuple | list) and len(size) == 2 and all(is_int(s) for s in size):
        h, w = int(size[0]), int(size[1])
    else:
        raise InputError(f"size must be an int or a (height, width) pair of ints, got {type(size).__name__} {size!r}")
    if not (16 <= h <= MAX_SIDE and 16 <= w <= MAX_SIDE):
        raise InputError(f"{what} sides must be in [16, {MAX_SIDE}], got {h}x{w}")
    return h, w


@functools.lru_cache(maxsize=64)
def _background_row(name: str, width: int) -> np.ndarray:
    return np.tile(np.array(BACKGROUNDS[name], dtype=np.uint8), width)  # (W * 3,)


def render(scene: Scene, size=256, out: np.ndarray | None = None) -> np.ndarray:
    """Render `scene` anti-aliased at `size` (int, or (height, width)) -> uint8 RGB (H, W, 3)."""
    check_scene(scene, "render")
    h, w = size_hw(size)
    if out is None:
        out = np.empty((h, w, 3), dtype=np.uint8)
    elif (not isinstance(out, np.ndarray) or out.shape != (h, w, 3) or out.dtype != np.uint8
          or not out.flags.c_contiguous or not out.flags.writeable):
        # contiguous: the background is written through a reshaped view, which must not be a copy
        if isinstance(out, np.ndarray):
            got = f"{out.dtype} {out.shape}" + ("" if out.flags.c_contiguous else ", not C-contiguous") + (
                "" if out.flags.writeable else ", read-only")
        else:
            got = type(out).__name__
        raise InputError(f"out must be a writable C-contiguous uint8 array of shape {(h, w, 3)} for size {size!r}, "
                         f"got {got}")
    # Fill through a flat (H, W * 3) view: numpy broadcasting over a length-3 axis is ~100x slower.
    out.reshape(h, w * 3)[:] = _background_row(scene.background, w)
    for obj in scene.objects:
        draw_object(out, obj, PALETTE[obj.color])
    return out


def render_batch(scenes, size=256) -> np.ndarray:
    """Render many scenes into one uint8 array (B, H, W, 3)."""
    h, w = size_hw(size)
    out = np.empty((len(scenes), h, w, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        render(scene, (h, w), out=out[i])
    return out


def to_tensor(image: np.ndarray):
    """uint8 (H, W, 3) or (B, H, W, 3) -> float32 torch tensor (3, H, W) / (B, 3, H, W) in [-1, 1]."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(image))
    t = t.permute(0, 3, 1, 2) if t.ndim == 4 else t.permute(2, 0, 1)  # (..., 3, H, W)
    return t.float().div_(127.5).sub_(1.0)
