"""The classical detector (OpenCV + numpy, no learned weights) and GenEval-style scoring.

`detect(image)` finds coloured objects on a neutral background:
1. work at <= 256 px on the shorter side (area filter: also averages away noise);
2. estimate the background as the median CIELAB colour of the image border;
3. foreground = pixels farther than `FOREGROUND_DELTA_E` from it; 8-connected components;
4. colour = nearest palette entry (CIELAB) of the median of each component's eroded interior, so the
   anti-aliased rim never votes; a component whose interior holds two palette colours in strength
   (two touching objects) is split by colour;
5. shape from contour geometry: the dominant harmonic of the radial profile r(theta) around the
   centroid (rotation invariant) tells 3 (triangle), 4 (square, cross) or 5 (star) corners, and a
   nearly flat profile is a circle; solidity (area / convex hull area) tells the concave cross
   from the square;
6. size from sqrt(area / unit area of that shape), nearest size name in log scale; position = centroid.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from ..errors import InputError
from .render import UNIT_AREAS
from .scene import CATEGORIES, PALETTE, SIZES, Scene, ShapeObject, check_scene, relation_holds

WORK_SIDE = 256  # detection runs at this shorter side (or the image's own, if smaller)
FOREGROUND_DELTA_E = 25.0  # CIELAB distance from the background above which a pixel is an object
MIN_AREA_FRACTION = 0.0015  # components smaller than this fraction of the image are noise
SOLIDITY_CROSS = (
    0.91  # cross ~0.78 (<= 0.908 even at blur sigma 2.5) vs square ~0.97 (>= 0.917 at JPEG 30 + noise 8)
)
CIRCLE_RIPPLE = (
    0.05  # a circle's radial profile has no harmonic above ~0.03 (square >= 0.10, star, triangle >= 0.17)
)
SPLIT_FRACTION = 0.1  # a second interior colour this strong means two touching objects
_HARMONICS = 64  # angular bins of the radial profile


def _lab8(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> OpenCV's 8-bit CIELAB (L * 255 / 100, a + 128, b + 128)."""
    return cv2.cvtColor(np.ascontiguousarray(rgb.reshape(-1, 1, 3)), cv2.COLOR_RGB2Lab).reshape(rgb.shape)


def _lab_float(lab8: np.ndarray) -> np.ndarray:
    """8-bit CIELAB -> float32 CIELAB (L in [0, 100], a and b in about [-128, 127])."""
    lab = lab8.astype(np.float32)
    lab[..., 0] *= 100.0 / 255.0
    lab[..., 1:] -= 128.0
    return lab


# Squared CIELAB distance from 8-bit Lab differences (L is stored scaled by 255 / 100): a lookup
# table of weighted squares per channel, then a channel sum.
_WEIGHTED_SQUARES = (
    np.arange(256, dtype=np.float32)[:, None] ** 2
    * np.array([(100.0 / 255.0) ** 2, 1.0, 1.0], dtype=np.float32)
).reshape(256, 1, 3)
_ONES = np.ones((1, 3), dtype=np.float32)


PALETTE_NAMES = tuple(PALETTE)
PALETTE_LAB = _lab_float(_lab8(np.array([PALETTE[c] for c in PALETTE_NAMES], dtype=np.uint8)))  # (8, 3)
_PALETTE_SQ = (PALETTE_LAB**2).sum(1)  # (8,)
_SIZE_NAMES = tuple(SIZES)
_LOG_SIZES = np.log([SIZES[s] for s in _SIZE_NAMES])


@dataclass(frozen=True)
class Detection:
    """One detected object: names as in the palette, centre (x, y) and area as fractions of the image."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    area: float
    scale: float  # estimated size scale (fraction of the shorter side), before snapping to `size`

    def matches(self, obj: ShapeObject, color: bool = True, size: bool = True) -> bool:
        """Same shape, and same colour / size where asked."""
        return (
            self.shape == obj.shape
            and (not color or self.color == obj.color)
            and (not size or self.size == obj.size)
        )


def _as_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise InputError(f"an image is uint8 (H, W, 3), got {image.dtype} {tuple(image.shape)}")
    if min(image.shape[:2]) < 16:
        raise InputError(f"image too small to detect objects: {image.shape[0]}x{image.shape[1]}")
    return np.ascontiguousarray(image[..., :3])


def _working(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    f = WORK_SIDE / min(h, w)
    if f >= 1:
        return np.ascontiguousarray(image)
    return cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


def segment(image) -> tuple[np.ndarray, list[Detection]]:
    """Detect objects; also return the label map at working resolution (0 = background, k + 1 = detection k)."""
    img = _working(_as_image(image))
    h, w = img.shape[:2]
    lab8 = cv2.cvtColor(img, cv2.COLOR_RGB2Lab)  # (h, w, 3) uint8
    border = np.concatenate(
        [
            lab8[:2].reshape(-1, 3),
            lab8[-2:].reshape(-1, 3),
            lab8[:, :2].reshape(-1, 3),
            lab8[:, -2:].reshape(-1, 3),
        ]
    )
    bg = np.median(border, axis=0)  # (3,)
    # Whole-image arithmetic through OpenCV: numpy reductions over a length-3 axis are slow.
    diff = cv2.absdiff(lab8, tuple(float(v) for v in bg) + (0.0,))  # (h, w, 3) uint8
    dist2 = cv2.transform(cv2.LUT(diff, _WEIGHTED_SQUARES), _ONES)  # (h, w) squared Delta E
    fg = (dist2 > FOREGROUND_DELTA_E**2).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    min_area = MIN_AREA_FRACTION * h * w
    side = min(h, w)
    out_labels = np.zeros((h, w), dtype=np.int32)
    detections: list[Detection] = []
    for k in range(1, n):
        x0, y0, bw, bh, area = stats[k]
        if area < min_area:
            continue
        # Crop with a 2-pixel frame so contours and erosions see background around the object.
        xa, ya, xb, yb = max(0, x0 - 2), max(0, y0 - 2), min(w, x0 + bw + 2), min(h, y0 + bh + 2)
        mask = (labels[ya:yb, xa:xb] == k).astype(np.uint8)
        d2 = dist2[ya:yb, xa:xb]
        for part, color in _split_by_color(mask, lab8[ya:yb, xa:xb], min_area):
            # Area at half contrast: the fixed foreground threshold would count faint rim pixels too.
            vals = d2[part > 0]
            contrast2 = np.partition(vals, (3 * len(vals)) // 4)[(3 * len(vals)) // 4]
            area = float(np.count_nonzero(vals > 0.25 * contrast2))
            det = _describe(part, color, area, xa, ya, w, h, side)
            if det is not None:
                detections.append(det)
                out_labels[ya:yb, xa:xb][part > 0] = len(detections)
    return out_labels, detections


def detect(image) -> list[Detection]:
    """Detect the objects of a shapes-world image (uint8 RGB (H, W, 3), any size)."""
    return segment(image)[1]


_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))


def _nearest_palette(lab_pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour of float CIELAB pixels (N, 3)."""
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2, and |x|^2 does not change the argmin.
    return (_PALETTE_SQ[None] - 2.0 * lab_pixels @ PALETTE_LAB.T).argmin(1)  # (N,)


def _split_by_color(mask: np.ndarray, lab8: np.ndarray, min_area: float):
    """Yield (mask, colour name) per object in one component: one, or several if colours touch."""
    inner = cv2.erode(mask, _KERNEL, iterations=2)
    if inner.sum() < 8:
        inner = mask
    pix = _lab_float(lab8[inner > 0])  # (N, 3)
    classes = _nearest_palette(pix)
    counts = np.bincount(classes, minlength=len(PALETTE_NAMES))
    strong = [
        c
        for c in np.argsort(-counts)
        if counts[c] >= SPLIT_FRACTION * len(classes) and counts[c] >= 0.3 * min_area
    ]
    if len(strong) <= 1:
        color = PALETTE_NAMES[int(_nearest_palette(np.median(pix, axis=0)[None])[0])]
        yield mask, color
        return
    cls_map = np.full(mask.shape, -1, dtype=np.int32)
    cls_map[inner > 0] = classes
    for c in strong:
        sub = (cls_map == c).astype(np.uint8)
        sub = cv2.morphologyEx(sub, cv2.MORPH_OPEN, _KERNEL)
        # Grow back the rim the erosion took, without leaving the component.
        sub = cv2.dilate(sub, _KERNEL, iterations=2) & mask
        n, lab_sub, stats, _ = cv2.connectedComponentsWithStats(sub, connectivity=8)
        for j in range(1, n):
            if stats[j, cv2.CC_STAT_AREA] >= min_area:
                yield (lab_sub == j).astype(np.uint8), PALETTE_NAMES[int(c)]


def shape_features(mask: np.ndarray) -> tuple[float, np.ndarray, tuple[float, float]] | None:
    """(solidity, harmonic amplitudes 0..8 of the radial profile, centroid (x, y)) of a binary mask."""
    # A 3x3 median removes single-pixel notches and spurs that noise leaves on the outline.
    mask = cv2.medianBlur(mask, 3)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    cnt = max(contours, key=cv2.contourArea)
    area = cv2.contourArea(cnt)
    hull_area = cv2.contourArea(cv2.convexHull(cnt))
    if hull_area <= 0:
        return None
    m = cv2.moments(mask, binaryImage=True)
    if m["m00"] == 0:
        return None
    cx, cy = m["m10"] / m["m00"], m["m01"] / m["m00"]
    pts = cnt[:, 0, :].astype(np.float64)  # (N, 2)
    dx, dy = pts[:, 0] - cx, pts[:, 1] - cy
    # The outermost contour point per angular bin: the profile of a star-shaped outline.
    bins = ((np.arctan2(dy, dx) + math.pi) * (_HARMONICS / (2 * math.pi))).astype(np.int64) % _HARMONICS
    prof = np.zeros(_HARMONICS)
    np.maximum.at(prof, bins, np.hypot(dx, dy) + 0.5)
    empty = prof == 0
    if empty.any():  # small outlines leave bins without a contour point: interpolate around the circle
        idx = np.flatnonzero(~empty)
        prof[empty] = np.interp(np.flatnonzero(empty), idx, prof[idx], period=_HARMONICS)
    spec = np.abs(np.fft.rfft(prof))
    harmonics = 2 * spec[:9] / spec[0]
    return area / hull_area, harmonics, (cx, cy)


def classify_shape(solidity: float, harmonics: np.ndarray) -> str:
    """Shape name from solidity and radial-profile harmonics (see the module docstring)."""
    order = 3 + int(np.argmax(harmonics[3:6]))  # 3, 4 or 5 corners
    if harmonics[order] < CIRCLE_RIPPLE:
        return "circle"
    if order == 3:
        return "triangle"
    if order == 5:
        return "star"
    return "square" if solidity >= SOLIDITY_CROSS else "cross"


def _describe(
    mask: np.ndarray, color: str, area: float, xa: int, ya: int, w: int, h: int, side: int
) -> Detection | None:
    feats = shape_features(mask)
    if feats is None:
        return None
    solidity, harmonics, (cx, cy) = feats
    shape = classify_shape(solidity, harmonics)
    scale = math.sqrt(area / UNIT_AREAS[shape]) / side
    size = _SIZE_NAMES[int(np.abs(_LOG_SIZES - math.log(max(scale, 1e-6))).argmin())]
    # Pixel centres are at integer coordinates: pixel i covers [i, i + 1) of the [0, W) frame.
    return Detection(shape, color, size, (xa + cx + 0.5) / w, (ya + cy + 0.5) / h, area / (w * h), scale)


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------


def exact_match(detections: list[Detection], scene: Scene, tol: float = 0.03) -> bool:
    """Whether detections and scene objects pair up one to one: same shape, colour, size, centre within `tol`."""
    _check_detections(detections, "exact_match")
    objs = check_scene(scene, "exact_match").objects
    if len(detections) != len(objs):
        return False
    for perm in itertools.permutations(detections):
        if all(d.matches(o) and math.hypot(d.x - o.x, d.y - o.y) <= tol for d, o in zip(perm, objs)):
            return True
    return False


def _check_detections(detections: object, what: str) -> None:
    if not isinstance(detections, list | tuple) or not all(isinstance(d, Detection) for d in detections):
        raise InputError(f"{what} needs a list of Detection (from detect(image)), got {type(detections).__name__} "
                         f"{detections!r:.60}")


def _asks(scene: Scene) -> tuple[bool, bool]:
    """Whether the caption names colours and sizes (what `Scene.caption` writes)."""
    color = scene.mention_color or scene.category in ("colors", "color_attr")
    size = scene.mention_size
    if scene.category == "counting":
        same = lambda a: len({getattr(o, a) for o in scene.objects}) == 1  # noqa: E731
        color, size = color and same("color"), size and same("size")
    return color, size


def _name(obj: ShapeObject, color: bool, size: bool) -> str:
    return " ".join(([obj.size] if size else []) + ([obj.color] if color else []) + [obj.shape])


def score(image, scene: Scene, detections: list[Detection] | None = None) -> dict:
    """GenEval-style check of what the caption asks -> {"category", "correct", "reason", "detected"}.

    single_object / colors: an object of that shape (and colour) is present; two_object / color_attr:
    both are; counting: exactly n objects of that shape (and colour); position: both are present
    and the relation holds between their centres. Attributes the caption does not name are ignored.
    """
    check_scene(scene, "score")
    if detections is not None:
        _check_detections(detections, "score")
    dets = detect(image) if detections is None else detections
    color, size = _asks(scene)
    objs = scene.objects
    match = lambda d, o: d.matches(o, color, size)  # noqa: E731
    cat = scene.category
    if cat in ("single_object", "colors"):
        ok = any(match(d, objs[0]) for d in dets)
        reason = "" if ok else f"no {_name(objs[0], color, size)} found"
    elif cat in ("two_object", "color_attr"):
        ok = any(match(a, objs[0]) and match(b, objs[1]) for a, b in itertools.permutations(dets, 2))
        missing = [_name(o, color, size) for o in objs if not any(match(d, o) for d in dets)]
        reason = (
            ""
            if ok
            else (f"no {' and no '.join(missing)} found" if missing else "both found only as one object")
        )
    elif cat == "counting":
        found = sum(match(d, objs[0]) for d in dets)
        ok = found == len(objs)
        reason = "" if ok else f"found {found} {_name(objs[0], color, size)}(s), expected {len(objs)}"
    elif cat == "position":
        pairs = [
            (a, b) for a, b in itertools.permutations(dets, 2) if match(a, objs[0]) and match(b, objs[1])
        ]
        ok = any(relation_holds((a.x, a.y), (b.x, b.y), scene.relation) for a, b in pairs)
        if ok:
            reason = ""
        elif pairs:
            reason = f"{_name(objs[0], color, size)} is not {scene.relation} {_name(objs[1], color, size)}"
        else:
            missing = [_name(o, color, size) for o in objs if not any(match(d, o) for d in dets)]
            reason = f"no {' and no '.join(missing)} found" if missing else "both found only as one object"
    else:  # pragma: no cover - Scene validates its category
        raise InputError(f"unknown category {cat!r}")
    found = [f"{d.size} {d.color} {d.shape} at ({d.x:.2f}, {d.y:.2f})" for d in dets]
    return {"category": cat, "correct": bool(ok), "reason": reason, "detected": found}


def summarize(results: list[dict], held_out: list[bool] | None = None) -> dict:
    """Per-category accuracy, overall (mean over categories, as GenEval), per-prompt mean, held-out accuracy."""
    table = {}
    for cat in CATEGORIES:
        rows = [r["correct"] for r in results if r["category"] == cat]
        if rows:
            table[cat] = {"n": len(rows), "accuracy": sum(rows) / len(rows)}
    out = {
        "categories": table,
        "overall": float(np.mean([v["accuracy"] for v in table.values()])) if table else float("nan"),
        "per_prompt": sum(r["correct"] for r in results) / max(1, len(results)),
        "n": len(results),
    }
    if held_out is not None:
        held = [r["correct"] for r, h in zip(results, held_out) if h]
        seen = [r["correct"] for r, h in zip(results, held_out) if not h]
        out["held_out"] = {"n": len(held), "accuracy": sum(held) / len(held) if held else float("nan")}
        out["seen"] = {"n": len(seen), "accuracy": sum(seen) / len(seen) if seen else float("nan")}
    return out


def format_table(summary: dict) -> str:
    """A GenEval-style text table of `summarize` output."""
    lines = [f"{'category':<16}{'n':>6}{'accuracy':>10}"]
    for cat, v in summary["categories"].items():
        lines.append(f"{cat:<16}{v['n']:>6}{v['accuracy']:>10.3f}")
    for key in ("held_out", "seen"):
        if key in summary:
            lines.append(f"{key:<16}{summary[key]['n']:>6}{summary[key]['accuracy']:>10.3f}")
    lines.append(f"{'overall':<16}{summary['n']:>6}{summary['overall']:>10.3f}")
    return "\n".join(lines)


def detection_dict(d: Detection) -> dict:
    """A JSON-ready dict of a detection."""
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(d).items()}
