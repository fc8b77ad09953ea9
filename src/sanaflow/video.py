"""Video input and output: read clips and frame folders, resize to a backbone's multiple, write H.264.

Frames are uint8 numpy arrays of shape (T, H, W, 3), RGB, everywhere in this module. Containers are
read with PyAV (mp4, mov, mkv, webm, gif, ...) with the rotation of the display matrix applied, so
phone videos come out upright; folders of PNG/JPG frames are read in natural name order (digit runs
compared as numbers, so ``frame2.png`` comes before ``frame10.png``, as ffmpeg's ``%d.png`` numbers
them). Every output is written atomically (`sanaflow.utils.atomic_path`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import InputError
from .utils import IMAGE_SUFFIXES, atomic_path, check_folder_writable, is_real

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".gif")
MAX_SIDE = 4096  # frames with a longer side are refused unless `max_side` downsizes them on read
MAX_BYTES = 8 * 2**30  # decoded frames above this size are refused: pick fewer frames instead
DEFAULT_FPS = 24.0  # for frame folders, which carry no frame rate


@dataclass
class VideoClip:
    """Decoded frames (T, H, W, 3) uint8 RGB and their frame rate."""

    frames: np.ndarray
    fps: float

    @property
    def num_frames(self) -> int:
        """Number of frames T."""
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the frames."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_video(
    path: str | os.PathLike,
    frames: int | None = None,
    start: int = 0,
    stride: int = 1,
    max_side: int | None = None,
    fps: float | None = None,
) -> VideoClip:
    """Read frames ``start, start+stride, ...`` (at most `frames` of them) from a video file or frame folder.

    `max_side` downsizes (area filter) frames whose longer side is above it; without it, frames
    larger than `MAX_SIDE` are refused. `fps` overrides the frame rate (frame folders default to 24).
    The returned fps is divided by `stride`, so the clip plays at the source speed.
    """
    path = Path(path)
    check_selection(frames, start, stride)
    if fps is not None:
        check_fps(fps)
    if max_side is not None and max_side < 8:
        raise InputError(f"max_side must be at least 8, got {max_side}")
    if not path.exists():
        raise InputError(f"video {str(path)!r} does not exist")
    if path.is_dir():
        out, src_fps = _read_folder(path, frames, start, stride, max_side)
    else:
        out, src_fps = _read_container(path, frames, start, stride, max_side)
    if not out:
        raise InputError(f"video {str(path)!r} has no frames at start={start} (stride {stride})")
    shapes = {f.shape for f in out}
    if len(shapes) > 1:
        raise InputError(f"frames of {str(path)!r} differ in size: {sorted(s[:2] for s in shapes)}")
    rate = fps if fps is not None else src_fps / stride
    return VideoClip(np.stack(out), float(rate))  # (T, H, W, 3)


def check_selection(frames: int | None, start: int, stride: int) -> None:
    """Refuse a frame selection (`frames` at most, from `start`, every `stride`-th) that picks nothing."""
    if frames is not None and frames < 1:
        raise InputError(f"--frames must be at least 1, got {frames}")
    if start < 0:
        raise InputError(f"--start must be >= 0, got {start}")
    if stride < 1:
        raise InputError(f"--stride must be >= 1, got {stride}")


def check_fps(fps: object, name: str = "fps") -> float:
    """`fps` as a float if it is a finite number above 0 (a frame rate); InputError naming `name` otherwise."""
    if not (is_real(fps) and math.isfinite(fps) and fps > 0):
        raise InputError(f"{name} must be a finite number above 0, got {fps!r} (frames per second)")
    return float(fps)


def _check_frame(frame: np.ndarray, path: Path, max_side: int | None, count: int) -> np.ndarray:
    h, w = frame.shape[:2]
    if max_side is not None and max(h, w) > max_side:
        frame = _resize(frame, *_fit(h, w, max_side))
    elif max_side is None and max(h, w) > MAX_SIDE:
        raise InputError(
            f"video {str(path)!r} is {w}x{h}, above the limit of {MAX_SIDE} pixels a side; "
            "downsize it on read (max_side=...)"
        )
    if (count + 1) * frame.nbytes > MAX_BYTES:
        raise InputError(
            f"video {str(path)!r}: {count + 1} decoded frames of {frame.shape[1]}x{frame.shape[0]} exceed "
            f"{MAX_BYTES / 2**30:.0f} GiB; read fewer frames (--frames, --stride) or smaller ones (max_side)"
        )
    return frame


def _fit(h: int, w: int, max_side: int) -> tuple[int, int]:
    scale = max_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def natural_key(name: str) -> tuple:
    """Sort key comparing digit runs as numbers: frame2.png < frame10.png (ties broken by the plain name)."""
    # re.split with a group puts the digit runs at the odd places, so a text never meets a number.
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name))), name


def _read_folder(
    path: Path, frames: int | None, start: int, stride: int, max_side: int | None
) -> tuple[list[np.ndarray], float]:
    """The images of a frame folder in natural name order (`natural_key`), as frames."""
    from PIL import Image, UnidentifiedImageError

    files = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    files.sort(key=lambda p: natural_key(p.name))
    if not files:
        raise InputError(f"frame folder {str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    chosen = files[start::stride]
    if frames is not None:
        chosen = chosen[:frames]
    out = []
    for f in chosen:
        try:
            with Image.open(f) as im:
                frame = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise InputError(f"cannot read frame {str(f)!r}: {e}") from e
        out.append(_check_frame(frame, path, max_side, len(out)))
    return out, DEFAULT_FPS


def has_pyav() -> bool:
    """Whether PyAV (the `video` extra, needed for mp4/mov/mkv/webm) is installed."""
    import importlib.util

    return importlib.util.find_spec("av") is not None


def _import_av(path: Path, verb: str):
    try:
        import av
    except ImportError:
        raise InputError(
            f"cannot {verb} {str(path)!r}: video files need PyAV (pip install 'sanaflow[video]'); without it "
            + ("write a .gif or a folder of frames" if verb == "write" else "read a folder of frames")
        ) from None
    return av


def _read_container(
    path: Path, frames: int | None, start: int, stride: int, max_side: int | None
) -> tuple[list[np.ndarray], float]:
    av = _import_av(path, "read")

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise InputError(
            f"cannot read video {str(path)!r} ({type(e).__name__}: {e}); "
            f"expected a video file ({', '.join(VIDEO_SUFFIXES)}) or a folder of frames"
        ) from e
    out: list[np.ndarray] = []
    with container:
        if not container.streams.video:
            raise InputError(f"{str(path)!r} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        src_fps = float(rate) if rate else DEFAULT_FPS
        index = -1
        try:
            for frame in container.decode(stream):
                index += 1
                if index < start or (index - start) % stride:
                    continue
                image = frame.to_ndarray(format="rgb24")  # (H, W, 3)
                # The display matrix says how far to turn the stored picture counter-clockwise to show it.
                turns = round(frame.rotation / 90) % 4
                if turns:
                    image = np.ascontiguousarray(np.rot90(image, k=turns))
                out.append(_check_frame(image, path, max_side, len(out)))
                if frames is not None and len(out) >= frames:
                    break
        except av.FFmpegError as e:
            if not out:
                raise InputError(f"cannot decode video {str(path)!r}: {e}") from e
            # A truncated file: keep the frames decoded before the damage.
    if index < 0:
        raise InputError(f"video {str(path)!r} holds no frames")
    return out, src_fps


# --------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------


def _resize(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    import cv2

    if (h, w) == frame.shape[:2]:
        return frame
    shrinking = h * w < frame.shape[0] * frame.shape[1]
    # Area averaging when shrinking avoids aliasing; Lanczos (TokenFlow's choice) when growing.
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
    return cv2.resize(frame, (w, h), interpolation=interp)


def _check_size(size, multiple: int) -> None:
    """Refuse target sizes outside [multiple, MAX_SIDE] before any pixel is resized."""
    if size is None:
        return
    sides = (size,) if isinstance(size, int) else tuple(size)
    if len(sides) not in (1, 2) or not all(isinstance(v, (int, np.integer)) for v in sides):
        raise InputError(f"size must be an int (longer side) or (height, width) ints, got {size!r}")
    if any(v < multiple or v > MAX_SIDE for v in sides):
        raise InputError(f"size {size!r} is out of range: each side must be in [{multiple}, {MAX_SIDE}] pixels")


@dataclass(frozen=True)
class CropPlan:
    """Where `resize_crop` takes its frames from: resize (H, W) to `resized`, then cut `size` at (top, left)."""

    resized: tuple[int, int]  # (height, width) the frames are resized to first (the input's: no resize)
    top: int
    left: int
    size: tuple[int, int]  # (height, width) of the centred crop, multiples of the backbone's multiple

    def crop(self, arrays: np.ndarray) -> np.ndarray:
        """Cut the crop out of arrays (T, *resized, ...) already at the `resized` size."""
        (th, tw), top, left = self.size, self.top, self.left
        return arrays[:, top : top + th, left : left + tw]

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """Resize (as `resize_crop`: area when shrinking, Lanczos when growing) and crop frames (T, H, W, 3)."""
        (rh, rw), (th, tw), top, left = self.resized, self.size, self.top, self.left
        out = [_resize(f, rh, rw)[top : top + th, left : left + tw] for f in frames]
        return np.ascontiguousarray(np.stack(out))  # (T, th, tw, 3)


def crop_plan(h: int, w: int, multiple: int = 8, size: int | tuple[int, int] | None = None) -> CropPlan:
    """The `CropPlan` of `resize_crop` for frames of h x w; `size` as there. The one home of the crop rule."""
    _check_size(size, multiple)
    if size is None:
        th, tw = (h // multiple) * multiple, (w // multiple) * multiple
        rh, rw = h, w
    elif isinstance(size, int):
        rh, rw = _fit(h, w, size)
        th, tw = (rh // multiple) * multiple, (rw // multiple) * multiple
    else:
        th, tw = int(size[0]), int(size[1])
        if th % multiple or tw % multiple:
            raise InputError(f"size {th}x{tw} (HxW) is not a multiple of {multiple}, which this model needs")
        scale = max(th / h, tw / w)
        rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
    if th < multiple or tw < multiple:
        raise InputError(f"frames of {w}x{h} are too small: each side must reach at least {multiple} pixels")
    return CropPlan((rh, rw), (rh - th) // 2, (rw - tw) // 2, (th, tw))


# Backbone multiples a `resize_crop`ped clip may come from (SD: 8, SANA: 32; tiny test models: smaller).
CROP_MULTIPLES = (2, 4, 8, 16, 32, 64)


def find_crop_plan(h: int, w: int, target: tuple[int, int]) -> CropPlan | None:
    """The `CropPlan` by which `resize_crop` turns h x w frames into `target` (height, width), or None.

    Tries only cropping first, then an int `size` (the longer side) for each of `CROP_MULTIPLES`, so an
    edit's frames can be matched with the part of the source they were made from.
    """
    th, tw = target
    longest = max(th, tw)
    for size in (None, *range(longest, longest + max(CROP_MULTIPLES))):
        for multiple in CROP_MULTIPLES:
            if th % multiple or tw % multiple:
                continue
            try:
                plan = crop_plan(h, w, multiple, size)
            except InputError:  # this size is out of range for this multiple
                continue
            if plan.size == (th, tw):
                return plan
    return None


def resize_crop(
    frames: np.ndarray, multiple: int = 8, size: int | tuple[int, int] | None = None
) -> np.ndarray:
    """Resize and centre-crop frames (T, H, W, 3) so both sides are multiples of `multiple`.

    `size` is the target (height, width) (resize to cover it, then crop), or an int for the longer
    side (aspect kept, then each side cropped down to the multiple), or None to only crop.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"frames must have shape (T, H, W, 3), got {tuple(frames.shape)}")
    plan = crop_plan(*frames.shape[1:3], multiple, size)
    th, tw = plan.size
    if len(frames) * th * tw * 3 > MAX_BYTES:
        raise InputError(
            f"{len(frames)} frames of {tw}x{th} would take more than {MAX_BYTES / 2**30:.0f} GiB; "
            "use fewer frames (--frames, --stride) or a smaller --size"
        )
    return plan.apply(frames)  # (T, th, tw, 3)


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Put two clips (T, H, W, 3) next to each other (the right one resized to the left's height)."""
    t = min(len(left), len(right))
    h = left.shape[1]
    if right.shape[1] != h:
        w = max(1, round(right.shape[2] * h / right.shape[1]))
        right = np.stack([_resize(f, h, w) for f in right[:t]])
    return np.concatenate([left[:t], right[:t]], axis=2)  # (T, H, W1 + W2, 3)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _as_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise InputError(f"frames must have shape (T, H, W, 3) with T >= 1, got {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise InputError(f"frames must be uint8, got {frames.dtype}")
    return frames


WRITE_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".gif")


def check_video_target(path: str | os.PathLike) -> Path:
    """Check, before any work, that `write_video` can write `path` (its suffix, its parent folder); creates nothing."""
    path = Path(path)
    if path.suffix.lower() not in WRITE_SUFFIXES and path.suffix != "":
        raise InputError(f"cannot write video {str(path)!r}: use .mp4, .mov, .mkv, .gif, or a folder (no suffix)")
    if path.suffix and path.is_dir():
        raise InputError(f"cannot write video {str(path)!r}: a folder of that name is in the way")
    if not path.suffix and path.is_file():
        raise InputError(f"cannot write frames into {str(path)!r}: a file of that name is in the way")
    # Judged without creating anything: the writers make the parent folders when they write, so a
    # run that fails after this check leaves no empty folder behind.
    check_folder_writable(path.parent, f"video {str(path)!r}")
    return path


def write_video(path: str | os.PathLike, frames, fps: float, crf: int = 18) -> Path:
    """Write frames (T, H, W, 3) uint8: H.264 mp4/mov/mkv, a GIF, or a folder of PNGs (no suffix)."""
    path = Path(path)
    frames = _as_frames(frames)
    check_fps(fps)
    suffix = path.suffix.lower()
    if suffix in (".mp4", ".mov", ".m4v", ".mkv"):
        _write_h264(path, frames, fps, crf)
    elif suffix == ".gif":
        _write_gif(path, frames, fps)
    elif suffix == "":
        write_frames(path, frames)
    else:
        raise InputError(f"cannot write video {str(path)!r}: use .mp4, .mov, .mkv, .gif, or a folder (no suffix)")
    return path


def _write_h264(path: Path, frames: np.ndarray, fps: float, crf: int) -> None:
    av = _import_av(path, "write")

    # yuv420p halves the chroma resolution, so H.264 needs even sides: pad by repeating the edge.
    t, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_path(path) as tmp:
        # The temp name has a .tmp suffix, so name the container format explicitly.
        fmt = {".mov": "mov", ".mkv": "matroska"}.get(path.suffix.lower(), "mp4")
        with av.open(str(tmp), mode="w", format=fmt) as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height = w + pw, h + ph
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            for image in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))


def gif_durations(count: int, fps: float) -> list[int]:
    """Per-frame GIF durations in ms, whole centiseconds, whose running sum tracks the times i / fps.

    GIF stores delays in 10 ms units, so one rounded delay for every frame plays 15 fps as 16.67
    (67 ms -> 70 or 60); rounding each frame's end time instead alternates 70, 60, 70 ms and keeps
    the average rate exact. Every frame lasts at least 10 ms (a 0 delay means "as fast as possible").
    """
    out, end = [], 0
    for i in range(count):
        nxt = max(end + 1, round((i + 1) * 100 / fps))  # centiseconds
        out.append(10 * (nxt - end))
        end = nxt
    return out


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=gif_durations(len(images), fps), loop=0)


def write_frames(folder: str | os.PathLike, frames) -> Path:
    """Write frames (T, H, W, 3) uint8 as ``frame_00000.png ...`` into a new folder (atomically)."""
    from PIL import Image

    folder = Path(folder)
    frames = _as_frames(frames)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for i, f in enumerate(frames):
            Image.fromarray(f).save(tmp / f"frame_{i:05d}.png")
    return folder
