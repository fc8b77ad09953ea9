"""Videos of the shapes world with exact ground truth, and the video-editing metrics.

A video is a *track*: per frame, every object's centre, rotation and scale (and the background's pan
offset). `render_track` turns a track into frames, per-frame object label maps, the exact forward
optical flow t -> t+1 of every pixel (each object moves rigidly: rotation + scaling + translation;
the background translates) and the mask of pixels where that flow is valid (the surface is still
visible at t+1, away from anti-aliased edges, inside the frame). The track is the JSON sidecar
written beside the mp4, so a saved video can be re-rendered exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import InputError, suggest
from ..utils import atomic_write_text, is_real
from ..video import CropPlan, find_crop_plan
from .detect import Detection, segment
from .render import draw_object, size_hw
from .scene import (
    BACKGROUNDS,
    EXTENT,
    HELD_OUT_PAIRS,
    PALETTE,
    SHAPES,
    SIZES,
    SPLITS,
    ShapeObject,
    derive_seed,
)

TRACK_FORMAT = "sanaflow-shapes-video"
TRACK_VERSION = 1


@dataclass
class ShapesVideo:
    """Frames and exact ground truth of a procedural video (see the module docstring)."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    labels: np.ndarray  # (T, H, W) uint8: 0 background, k + 1 where object k is visible
    flow: np.ndarray  # (T - 1, H, W, 2) float32 forward flow (dx, dy) in pixels
    valid: np.ndarray  # (T - 1, H, W) bool: flow is valid (not occluded, not an edge, stays in frame)
    visibility: np.ndarray  # (T, K) float32: visible fraction of object k's own area
    track: dict  # JSON-ready scene track: re-renders everything above
    fps: float

    @property
    def num_objects(self) -> int:
        """Number of objects K."""
        return len(self.track["objects"])

    def object_masks(self, k: int) -> np.ndarray:
        """Visible mask of object k in every frame: (T, H, W) bool."""
        return self.labels == k + 1

    def objects_at(self, t: int) -> list[ShapeObject]:
        """The objects as drawn in frame t (size names of frame 0; see `track` for the scale)."""
        return [
            ShapeObject(o["shape"], o["color"], o["size"], o["x"][t], o["y"][t], o["rotation"][t])
            for o in self.track["objects"]
        ]


# ------------------------------------------------------------------------------------------------
# Sampling a track
# ------------------------------------------------------------------------------------------------


def random_track(
    seed: int, frames: int = 16, size=256, num_objects: int | None = None, pan: bool = False, fps: float = 8.0
) -> dict:
    """A random scene track: objects on smooth paths (object 1 crosses object 0, so one occludes the other)."""
    if not isinstance(frames, int) or not 2 <= frames <= 1000:
        raise InputError(f"frames must be an integer in [2, 1000], got {frames!r}")
    if num_objects is not None and (
        not isinstance(num_objects, int | np.integer) or isinstance(num_objects, bool) or not 1 <= num_objects <= 4
    ):
        raise InputError(f"num_objects must be None or an integer in [1, 4], got {num_objects!r}")
    if not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    h, w = size_hw(size, "video")
    if not isinstance(pan, bool | np.bool_):
        raise InputError(f"pan must be True or False, got {pan!r}")
    if not _finite(fps) or fps <= 0:
        raise InputError(f"fps must be a finite number above 0, got {fps!r}")
    rng = random.Random(derive_seed(SPLITS["video"], seed))
    k = num_objects if num_objects is not None else rng.randint(2, 3)
    colors = rng.sample(list(PALETTE), k)  # distinct colours: touching objects stay separable
    tau = np.linspace(0.0, 1.0, frames)
    ease = (1 - np.cos(math.pi * tau)) / 2  # (T,) smooth start and stop
    for _ in range(100):
        objects = _paths(rng, k, colors, frames, tau, ease)
        # Start apart: every object fully visible in frame 0, so the clip opens on a clean scene.
        radii = [SIZES[o["size"]] * EXTENT[o["shape"]] * o["scale"][0] for o in objects]
        if all(
            math.hypot(a["x"][0] - b["x"][0], a["y"][0] - b["y"][0]) > radii[i] + radii[j] + 0.02
            for i, a in enumerate(objects)
            for j, b in enumerate(objects)
            if i < j
        ):
            break
    background = rng.choice(list(BACKGROUNDS))
    texture = None
    offsets = np.zeros((frames, 2))
    if pan:
        v = np.array([rng.uniform(-3, 3), rng.uniform(-3, 3)])  # pixels per frame
        offsets = v[None] * np.arange(frames)[:, None]
        texture = [
            {
                "amp": rng.uniform(3, 7),
                "kx": rng.uniform(-0.12, 0.12),
                "ky": rng.uniform(-0.12, 0.12),
                "phase": rng.uniform(0, 2 * math.pi),
            }
            for _ in range(3)
        ]
    return {
        "format": TRACK_FORMAT,
        "version": TRACK_VERSION,
        "seed": seed,
        "size": [h, w],
        "fps": fps,
        "frames": frames,
        "background": background,
        "texture": texture,
        "pan": [[round(float(a), 4), round(float(b), 4)] for a, b in offsets],
        "objects": objects,  # drawn in this order: later objects occlude earlier ones
    }


def _paths(
    rng: random.Random, k: int, colors: list[str], frames: int, tau: np.ndarray, ease: np.ndarray
) -> list[dict]:
    """Objects on eased straight paths with a little wobble, spin and breathing scale."""
    objects = []
    mid0 = None
    for i in range(k):
        shape = rng.choice([s for s in SHAPES if (colors[i], s) not in HELD_OUT_PAIRS])
        size_name = rng.choice(["medium", "large"] if k <= 3 else ["small", "medium"])
        amp = rng.uniform(0.0, 0.15)
        r = SIZES[size_name] * EXTENT[shape] * (1 + amp) + 0.03
        lo, hi = r, 1 - r
        p0 = np.array([rng.uniform(lo, hi), rng.uniform(lo, hi)])
        p1 = np.clip(p0 + [rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3)], lo, hi)
        if i == 1:
            # Send object 1 fast across object 0's mid-clip position: a brief occlusion half way.
            for attempt in range(40):
                a = rng.uniform(0, 2 * math.pi)
                d = (0.38 - 0.006 * attempt) * np.array([math.cos(a), math.sin(a)])
                if np.all((mid0 - d >= lo) & (mid0 - d <= hi) & (mid0 + d >= lo) & (mid0 + d <= hi)):
                    p0, p1 = mid0 - d, mid0 + d
                    break
        wobble = 0.015 * np.sin(2 * math.pi * tau + rng.uniform(0, 2 * math.pi))
        xy = np.clip(p0[None] + (p1 - p0)[None] * ease[:, None] + wobble[:, None], lo, hi)  # (T, 2)
        if i == 0:
            mid0 = xy[frames // 2]
        spin = rng.uniform(-8.0, 8.0) if shape != "circle" else 0.0
        rot = rng.uniform(0, 360) + spin * np.arange(frames)
        scale = 1 + amp * np.sin(2 * math.pi * tau + rng.uniform(0, 2 * math.pi))
        objects.append(
            {
                "shape": shape,
                "color": colors[i],
                "size": size_name,
                "x": [round(float(v), 5) for v in xy[:, 0]],
                "y": [round(float(v), 5) for v in xy[:, 1]],
                "rotation": [round(float(v), 3) for v in rot],
                "scale": [round(float(v), 5) for v in scale],
            }
        )
    return objects


# ------------------------------------------------------------------------------------------------
# Rendering a track with ground truth
# ------------------------------------------------------------------------------------------------


def _check_video(video: object, what: str) -> ShapesVideo:
    if not isinstance(video, ShapesVideo):
        hint = "; for a saved video, load it with load_video(path) first" if isinstance(video, str | os.PathLike) else ""
        raise InputError(f"{what} needs a ShapesVideo (from random_video or load_video), "
                         f"got {type(video).__name__} {video!r:.60}{hint}")
    return video


def _check_frames(frames: object, what: str) -> np.ndarray:
    """`frames` as an array, if it is uint8 (T, H, W, 3) with T, H, W >= 1; InputError otherwise."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or min(frames.shape[:3]) < 1:
        raise InputError(f"{what} must be uint8 RGB frames (T, H, W, 3) with T, H, W >= 1, "
                         f"got {frames.dtype} {frames.shape}")
    return frames


def _check_track(track: dict) -> None:
    if not isinstance(track, dict) or track.get("format") != TRACK_FORMAT:
        raise InputError(f"not a shapes-video track (expected format {TRACK_FORMAT!r})")
    if track.get("version") != TRACK_VERSION:
        raise InputError(
            f"shapes-video track version {track.get('version')!r} is not supported (need {TRACK_VERSION})"
        )
    missing = [k for k in ("frames", "size", "fps", "objects", "background", "texture", "pan") if k not in track]
    if missing:
        raise InputError(f"shapes-video track lacks {', '.join(missing)}")
    t = track["frames"]
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise InputError(f"track 'frames' must be an integer >= 1, got {t!r}")
    size_hw(track["size"], "track 'size'")
    fps = track["fps"]
    if not _finite(fps) or fps <= 0:
        raise InputError(f"track 'fps' must be a finite number above 0, got {fps!r}")
    if not isinstance(track["objects"], list) or not all(isinstance(o, dict) for o in track["objects"]):
        raise InputError("track 'objects' must be a list of objects (mappings)")
    for k, o in enumerate(track["objects"]):
        lacking = [key for key in ("shape", "color", "size", "x", "y", "rotation", "scale") if key not in o]
        if lacking:
            raise InputError(f"track object {k} lacks {', '.join(lacking)}")
        ShapeObject(o["shape"], o["color"], o["size"], 0.5, 0.5)  # validates the names
        for key in ("x", "y", "rotation", "scale"):
            _check_path(o[key], t, f"track object {k} '{key}'")
    _check_path(track["pan"], t, "track 'pan'", width=2)
    texture = track["texture"]
    if texture is not None and not isinstance(texture, list) or texture and not all(
            isinstance(w, dict) and all(_finite(w.get(key)) for key in ("amp", "kx", "ky", "phase"))
            for w in texture):
        raise InputError("track 'texture' must be null or a list of waves {amp, kx, ky, phase} (numbers)")
    if not isinstance(track["background"], str) or track["background"] not in BACKGROUNDS:
        raise InputError(f"unknown background {track['background']!r}; choose from {', '.join(BACKGROUNDS)}")


def _finite(v) -> bool:
    return is_real(v) and math.isfinite(v)


def _check_path(values, frames: int, what: str, width: int | None = None) -> None:
    """A per-frame path: `frames` finite numbers (or `width`-number rows)."""
    ok = isinstance(values, list) and len(values) == frames and all(
        _finite(v) if width is None else
        isinstance(v, list) and len(v) == width and all(_finite(c) for c in v) for v in values)
    if not ok:
        shape = f"{frames} finite numbers" if width is None else f"{frames} pairs of finite numbers"
        raise InputError(f"{what} must be a list of {shape} (one per frame)")


def _background(track: dict, t: int, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    h, w = track["size"]
    base = np.array(BACKGROUNDS[track["background"]], dtype=np.float32)
    if not track["texture"]:
        return np.broadcast_to(base.astype(np.uint8), (h, w, 3)).copy()
    xs, ys = grid
    ox, oy = track["pan"][t]
    # Frame t shows the texture translated by the pan offset: I_t(p) = texture(p - offset_t).
    tex = np.zeros((h, w), dtype=np.float32)
    for wave in track["texture"]:
        tex += wave["amp"] * np.sin(wave["kx"] * (xs - ox) + wave["ky"] * (ys - oy) + wave["phase"])
    img = base[None, None] + tex[..., None]  # (H, W, 3)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _edges(labels: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds another label (anti-aliased, mixed colours)."""
    return cv2.dilate(labels, np.ones((3, 3), np.uint8)) != cv2.erode(labels, np.ones((3, 3), np.uint8))


def render_track(track: dict) -> ShapesVideo:
    """Render a track -> frames, label maps, exact forward flow, valid mask and visibility."""
    _check_track(track)
    h, w = track["size"]
    T, objs = track["frames"], track["objects"]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)  # pixel centres at integer coordinates
    frames = np.empty((T, h, w, 3), dtype=np.uint8)
    labels = np.zeros((T, h, w), dtype=np.uint8)
    visibility = np.zeros((T, len(objs)), dtype=np.float32)
    own = np.zeros((len(objs),), dtype=np.float64)
    scratch = np.zeros((h, w), dtype=np.uint8)
    for t in range(T):
        img = _background(track, t, (xs, ys))
        for k, o in enumerate(objs):
            obj = ShapeObject(o["shape"], o["color"], o["size"], o["x"][t], o["y"][t], o["rotation"][t])
            draw_object(img, obj, PALETTE[o["color"]], scale=o["scale"][t])
            draw_object(labels[t], obj, k + 1, scale=o["scale"][t], antialias=False)
            scratch[:] = 0
            draw_object(scratch, obj, 1, scale=o["scale"][t], antialias=False)
            own[k] = scratch.sum()
        frames[t] = img
        counts = np.bincount(labels[t].ravel(), minlength=len(objs) + 1)[1:]
        visibility[t] = counts / np.maximum(own, 1)
    flow = np.zeros((T - 1, h, w, 2), dtype=np.float32)
    valid = np.zeros((T - 1, h, w), dtype=bool)
    edges = [_edges(labels[t]) for t in range(T)]
    for t in range(T - 1):
        fx, fy = flow[t, ..., 0], flow[t, ..., 1]
        d = np.subtract(track["pan"][t + 1], track["pan"][t])
        fx[:] = d[0]
        fy[:] = d[1]
        for k, o in enumerate(objs):
            sel = labels[t] == k + 1
            if not sel.any():
                continue
            # Rigid motion of the object's surface: p' = c1 + (s1 / s0) R(r1 - r0) (p - c0). Angles
            # turn clockwise on screen (y down), matching render.outline.
            c0 = (o["x"][t] * w - 0.5, o["y"][t] * h - 0.5)
            c1 = (o["x"][t + 1] * w - 0.5, o["y"][t + 1] * h - 0.5)
            ratio = o["scale"][t + 1] / o["scale"][t]
            a = math.radians(o["rotation"][t + 1] - o["rotation"][t])
            ca, sa = ratio * math.cos(a), ratio * math.sin(a)
            px, py = xs[sel] - c0[0], ys[sel] - c0[1]
            fx[sel] = c1[0] + ca * px - sa * py - xs[sel]
            fy[sel] = c1[1] + sa * px + ca * py - ys[sel]
        tx, ty = xs + fx, ys + fy
        ix, iy = np.rint(tx).astype(np.int64), np.rint(ty).astype(np.int64)
        inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        ixc, iyc = np.clip(ix, 0, w - 1), np.clip(iy, 0, h - 1)
        # Valid where the same surface is visible at the target and neither end is an edge pixel.
        valid[t] = inside & (labels[t + 1][iyc, ixc] == labels[t]) & ~edges[t] & ~edges[t + 1][iyc, ixc]
    return ShapesVideo(frames, labels, flow, valid, visibility, track, float(track["fps"]))


def random_video(
    seed: int, frames: int = 16, size=256, num_objects: int | None = None, pan: bool = False, fps: float = 8.0
) -> ShapesVideo:
    """A random procedural video with exact ground truth (see `random_track` and `render_track`)."""
    return render_track(random_track(seed, frames, size, num_objects, pan, fps))


def video_caption(video: ShapesVideo, edit: dict | None = None) -> str:
    """'a red circle, a blue square and a green star', after applying `edit` (see `check_edit`)."""
    edit = check_edit(edit, _check_video(video, "video_caption"))
    phrases = []
    for k, o in enumerate(video.track["objects"]):
        o = {**o, **edit.get(k, {})}
        words = f"{o['color']} {o['shape']}"
        phrases.append(("an " if words[0] in "aeiou" else "a ") + words)
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


# ------------------------------------------------------------------------------------------------
# Saving and loading
# ------------------------------------------------------------------------------------------------


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON track written beside a video: clip.mp4 -> clip.json."""
    return Path(path).with_suffix(".json")


def save_video(video: ShapesVideo, path: str | os.PathLike) -> Path:
    """Write the frames as H.264 mp4 and the track as a JSON sidecar (both atomically)."""
    from ..video import write_video

    path = Path(path)
    write_video(path, video.frames, video.fps)
    atomic_write_text(sidecar_path(path), json.dumps(video.track))
    return path


def load_track(path: str | os.PathLike) -> dict:
    """Read and check the JSON sidecar of a saved shapes video."""
    side = sidecar_path(path)
    if not side.is_file():
        raise InputError(
            f"no scene track {str(side)!r} beside {str(path)!r}: the source must be a video saved by "
            f"`sanaflow shapes video` (mp4 + JSON sidecar)"
        )
    try:
        track = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read scene track {str(side)!r}: {e}") from e
    _check_track(track)
    return track


def load_video(path: str | os.PathLike) -> ShapesVideo:
    """Load a saved shapes video: decoded frames from the mp4, ground truth re-rendered from the sidecar."""
    from ..video import read_video

    track = load_track(path)
    clip = read_video(path)
    video = render_track(track)
    t, h, w = video.frames.shape[:3]
    if (
        clip.frames.shape[0] == t
        and clip.frames.shape[1] - h in (0, 1)
        and clip.frames.shape[2] - w in (0, 1)
    ):
        clip.frames = clip.frames[:, :h, :w]  # H.264 pads odd sides by one pixel
    if clip.frames.shape != video.frames.shape:
        raise InputError(
            f"video {str(path)!r} has frames {clip.frames.shape}, its track describes {video.frames.shape}"
        )
    video.frames = clip.frames
    return video


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def warp_error(frames: np.ndarray, flow: np.ndarray, valid: np.ndarray) -> float:
    """Occlusion-masked MSE (values in [0, 1]) between frame t and frame t+1 sampled along the forward flow.

    Both ways of warping measure the same thing: a pixel and where the flow carries it must look alike.
    """
    frames = np.asarray(frames)
    t, h, w = frames.shape[:3]
    if flow.shape != (t - 1, h, w, 2) or valid.shape != (t - 1, h, w):
        raise InputError(f"flow {flow.shape} / valid {valid.shape} do not fit frames {frames.shape}")
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    total, count = 0.0, 0
    for i in range(t - 1):
        nxt = cv2.remap(
            frames[i + 1],
            xs + flow[i, ..., 0],
            ys + flow[i, ..., 1],
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )  # (H, W, 3): frame t+1 seen from frame t
        diff = (nxt.astype(np.float32) - frames[i].astype(np.float32)) / 255.0  # (H, W, 3)
        m = valid[i]
        total += float((diff[m] ** 2).sum())
        count += int(m.sum()) * 3
    return total / max(count, 1)


def dis_flow(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV DIS forward flow t -> t+1 of frames (T, H, W, 3) and a forward-backward consistency mask."""
    frames = _check_frames(frames, "dis_flow frames")
    t, h, w = frames.shape[:3]
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    flows = np.zeros((t - 1, h, w, 2), dtype=np.float32)
    valid = np.zeros((t - 1, h, w), dtype=bool)
    for i in range(t - 1):
        try:
            fw = dis.calc(gray[i], gray[i + 1], None)  # (H, W, 2)
            bw = dis.calc(gray[i + 1], gray[i], None)
        except cv2.error as e:  # the frames are checked above: what DIS still refuses is a frame too small
            raise InputError(f"dis_flow: frames of {h}x{w} are too small for DIS optical flow "
                             f"(16x16 and larger work)") from e
        bw_at = cv2.remap(
            bw, xs + fw[..., 0], ys + fw[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        err = ((fw + bw_at) ** 2).sum(-1)
        mag = (fw**2).sum(-1) + (bw_at**2).sum(-1)
        tx, ty = xs + fw[..., 0], ys + fw[..., 1]
        inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
        flows[i] = fw
        valid[i] = inside & (err < 0.01 * mag + 0.5)
    return flows, valid


def check_edit(edit: dict | None, video: ShapesVideo) -> dict[int, dict]:
    """Validate an edit {object index: {"color"?: name, "shape"?: name}} -> a copy with int keys."""
    video = _check_video(video, "an edit")
    if edit is None:
        return {}
    if not isinstance(edit, dict):
        raise InputError(f"an edit is a dict {{object index: {{'color': name, 'shape': name}}}}, e.g. "
                         f"{{0: {{'color': 'green'}}}}, got {type(edit).__name__} {edit!r:.60}")
    out = {}
    last = video.num_objects - 1
    for k, change in edit.items():
        if not isinstance(k, int | np.integer) or isinstance(k, bool | np.bool_) or not 0 <= k <= last:
            raise InputError(f"an edit's keys are object indices, integers in 0..{last} for this video; "
                             f"got {type(k).__name__} {k!r}")
        k = int(k)
        if not isinstance(change, dict):
            raise InputError(f"edit of object {k}: expected a dict like {{'color': 'green', 'shape': 'star'}}, "
                             f"got {type(change).__name__} {change!r:.60}")
        bad = [key for key in change if key not in ("color", "shape")]
        if bad:
            raise InputError(f"edit of object {k}: an edit changes 'color' and/or 'shape', got {bad}")
        for key, names in (("color", PALETTE), ("shape", SHAPES)):
            if key not in change:
                continue
            value = change[key]
            if not isinstance(value, str):
                raise InputError(f"edit of object {k}: {key} must be a name (a string), got {type(value).__name__} "
                                 f"{value!r:.60}; choose from: {', '.join(names)}")
            if value not in names:
                raise InputError(f"edit of object {k}: unknown {key} {value!r}{suggest(value, names)}; "
                                 f"choose from: {', '.join(names)}")
        out[k] = dict(change)
    return out


def crop_video(video: ShapesVideo, plan: CropPlan) -> ShapesVideo:
    """`video` as `sanaflow.video.resize_crop` with `plan` makes it: frames, labels, flow, valid mask,
    visibility and track all resized and cropped alike, so an edit of the cropped frames can be scored."""
    video = _check_video(video, "crop_video")
    t, h, w = video.frames.shape[:3]
    (rh, rw), (th, tw) = plan.resized, plan.size
    labels, flow, valid = video.labels, video.flow, video.valid
    if (rh, rw) != (h, w):
        labels = np.stack([cv2.resize(m, (rw, rh), interpolation=cv2.INTER_NEAREST) for m in labels])
        scale = np.array([rw / w, rh / h], dtype=np.float32)  # displacements in resized pixels
        flow = np.stack([cv2.resize(f, (rw, rh), interpolation=cv2.INTER_LINEAR) for f in flow]) * scale
        # A resized pixel's flow is valid only where every source pixel it mixes is.
        valid = np.stack([cv2.resize(v.astype(np.float32), (rw, rh), interpolation=cv2.INTER_AREA) > 0.999
                          for v in valid])
    k = video.num_objects
    whole = np.stack([np.bincount(m.ravel(), minlength=k + 1)[1:] for m in labels])  # (T, K)
    labels, flow, valid = plan.crop(labels), plan.crop(flow), plan.crop(valid)  # (T, th, tw[, 2])
    kept = np.stack([np.bincount(m.ravel(), minlength=k + 1)[1:] for m in labels])  # (T, K)
    visibility = (video.visibility * kept / np.maximum(whole, 1)).astype(np.float32)
    # The crop's edge is the frame's edge now: flow leaving it is not valid (as `render_track` judges it).
    ys, xs = np.mgrid[0:th, 0:tw].astype(np.float32)
    ix, iy = np.rint(xs + flow[..., 0]), np.rint(ys + flow[..., 1])
    valid = valid & (ix >= 0) & (ix < tw) & (iy >= 0) & (iy < th)
    # Centres in the renderer's convention (pixel p covers [p - 0.5, p + 0.5] at x * w - 0.5), sizes
    # as fractions of the shorter side.
    grow = min(rh, rw) / min(th, tw)
    objects = [
        {**o, "x": [(x * rw - plan.left) / tw for x in o["x"]], "y": [(y * rh - plan.top) / th for y in o["y"]],
         "scale": [s * grow for s in o["scale"]]}
        for o in video.track["objects"]
    ]
    track = {**video.track, "size": [th, tw], "objects": objects}
    return ShapesVideo(plan.apply(video.frames), np.ascontiguousarray(labels), np.ascontiguousarray(flow),
                       np.ascontiguousarray(valid), visibility, track, video.fps)


def _fit(frames: np.ndarray, video: ShapesVideo) -> tuple[np.ndarray, ShapesVideo]:
    """The edited frames and the source they are judged against, at one size.

    Frames of the size `resize_crop` makes from the source (as `sanaflow edit` does) are judged
    against the source cropped the same way; frames of any other size are resized to the source's.
    """
    frames = _check_frames(frames, "edited frames")
    if len(frames) != len(video.frames):
        raise InputError(f"the edited video has {len(frames)} frames, the source {len(video.frames)}")
    h, w = video.frames.shape[1:3]
    if frames.shape[1:3] == (h, w):
        return frames, video
    plan = find_crop_plan(h, w, frames.shape[1:3])
    if plan is not None:
        return frames, crop_video(video, plan)
    return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames]), video


def _matching(dets: list[Detection], labels: np.ndarray, gt: np.ndarray) -> tuple[int, float]:
    """The detection overlapping mask `gt` most, and its IoU (labels and gt at the same resolution)."""
    hits = np.bincount(labels[gt], minlength=len(dets) + 1)[1:]
    if hits.size == 0 or hits.max() == 0:
        return -1, 0.0
    j = int(hits.argmax())
    union = int(gt.sum()) + int((labels == j + 1).sum()) - int(hits[j])
    return j, float(hits[j] / max(union, 1))


EDGE_MARGIN = 3.0  # pixels added to an edited object's circumradius: anti-aliasing and a decoder's blur


def edit_valid_mask(video: ShapesVideo, edit: dict[int, dict[str, str]], valid: np.ndarray) -> np.ndarray:
    """`valid` (T - 1, H, W) without the pixels whose true motion a shape edit leaves unknown.

    The flow is the *source* video's. Inside an edited object's source footprint it stays right (the
    new shape moves rigidly with the object), but around it a pixel the flow calls static background
    may belong to the new shape at t or t + 1 (and the other way round), so a correct shape edit
    would read as flicker there. Those pixels (within the larger of the two shapes' circumradius of
    the object's centre at t or t + 1) are left out, except inside its source footprint at t away
    from every other object (where one that the old outline hid may show through the new one).
    """
    edit = check_edit(edit, video)
    valid = np.asarray(valid)
    if valid.shape != video.valid.shape:
        raise InputError(f"valid must have the shape of the video's flow mask {video.valid.shape}, got {valid.shape}")
    return valid & ~_edit_unknown(video, edit, valid.shape)


def _edit_unknown(video: ShapesVideo, edit: dict[int, dict[str, str]], shape: tuple[int, ...]) -> np.ndarray:
    # The pixels `edit_valid_mask` leaves out, (T - 1, H, W): independent of the flow's own mask.
    t_count, h, w = shape
    unknown = np.zeros(shape, dtype=bool)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)  # pixel centres, as the renderer's flow
    objects = video.track["objects"]

    def disc(o: dict, extent: float, frames: tuple[int, int]) -> np.ndarray:
        near = np.zeros((h, w), dtype=bool)
        for f in frames:
            r = extent * o["scale"][f] * max(h, w) + EDGE_MARGIN
            near |= (xs - (o["x"][f] * w - 0.5)) ** 2 + (ys - (o["y"][f] * h - 0.5)) ** 2 <= r * r
        return near

    for k, change in edit.items():
        if "shape" not in change:
            continue  # a colour edit keeps every outline: the source flow holds
        o = objects[k]
        extent = SIZES[o["size"]] * max(EXTENT[o["shape"]], EXTENT[change["shape"]])
        for t in range(t_count):
            others = np.zeros((h, w), dtype=bool)
            for j, other in enumerate(objects):
                if j != k:
                    others |= disc(other, SIZES[other["size"]] * EXTENT[other["shape"]], (t, t + 1))
            kept = (video.labels[t] == k + 1) & ~others
            unknown[t] |= disc(o, extent, (t, t + 1)) & ~kept
    return unknown


def video_metrics(
    edited: np.ndarray, source: ShapesVideo, edit: dict | None = None, min_visible: float = 0.9,
    dis: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Edit accuracy, structure preservation (mask IoU) and warp errors (ground-truth and DIS flow).

    edit_accuracy: fraction of frames in which every edited object (at least `min_visible` visible)
    is detected near its true centre with its target colour and shape. structure_iou: mean IoU
    between each object's true visible mask and the detected mask overlapping it most, over objects
    whose shape is not edited. warp_error_gt / warp_error_dis: `warp_error` of the edited frames
    along the ground-truth flow / the DIS flow of the source frames, on `edit_valid_mask` (a shape
    edit's new outline is not flicker); *_all: on the flows' plain masks. `dis`: the source's
    `dis_flow`, when the caller already has it.
    """
    source = _check_video(source, "video_metrics source")
    edited, source = _fit(edited, source)  # a resize_crop'ed edit is judged against the same crop
    edit = check_edit(edit, source)
    if not is_real(min_visible) or not 0 < min_visible <= 1:  # nan fails the comparison too
        raise InputError(f"min_visible is the visible fraction an edited object needs to be judged, a number in "
                         f"(0, 1]; got {min_visible!r}")
    if dis is not None and not (isinstance(dis, tuple | list) and len(dis) == 2
                                and all(isinstance(a, np.ndarray) for a in dis)):
        raise InputError(f"dis must be None or the (flow, valid) arrays of dis_flow(source.frames), got {dis!r:.60}")
    T = len(edited)
    h, w = source.frames.shape[1:3]
    correct, judged, ious = 0, 0, []
    for t in range(T):
        labels, dets = segment(edited[t])
        lh, lw = labels.shape
        gt_labels = (
            source.labels[t]
            if (lh, lw) == (h, w)
            else cv2.resize(source.labels[t], (lw, lh), interpolation=cv2.INTER_NEAREST)
        )
        objs = source.track["objects"]
        for k in range(len(objs)):
            if "shape" in edit.get(k, {}) or source.visibility[t, k] < 0.3:
                continue
            ious.append(_matching(dets, labels, gt_labels == k + 1)[1])
        if edit:
            visible = [k for k in edit if source.visibility[t, k] >= min_visible]
            if not visible:
                continue
            judged += 1
            ok = True
            for k in visible:
                o = objs[k]
                target = {"shape": o["shape"], "color": o["color"], **edit[k]}
                radius = SIZES[o["size"]] * EXTENT[target["shape"]] * o["scale"][t]
                ok &= any(
                    d.shape == target["shape"]
                    and d.color == target["color"]
                    and math.hypot(d.x - o["x"][t], d.y - o["y"][t]) <= max(0.5 * radius, 0.03)
                    for d in dets
                )
            correct += ok
    flow, dis_valid = dis_flow(source.frames) if dis is None else dis
    unknown = _edit_unknown(source, edit, source.valid.shape)  # (T - 1, H, W), once for both flows
    return {
        "frames": T,
        "edit_accuracy": correct / judged if judged else None,
        "judged_frames": judged,
        "structure_iou": float(np.mean(ious)) if ious else None,
        "warp_error_gt": warp_error(edited, source.flow, source.valid & ~unknown),
        "warp_error_dis": warp_error(edited, flow, dis_valid & ~unknown),
        "warp_error_gt_all": warp_error(edited, source.flow, source.valid),
        "warp_error_dis_all": warp_error(edited, flow, dis_valid),
        "source_warp_error_gt": warp_error(source.frames, source.flow, source.valid),
        "source_warp_error_dis": warp_error(source.frames, flow, dis_valid),
    }
