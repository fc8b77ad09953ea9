"""Video I/O on procedurally generated clips."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from PIL import Image

from sanaflow.errors import InputError
from sanaflow.video import read_video, resize_crop, side_by_side, write_frames, write_video


def moving_square(t: int = 12, h: int = 48, w: int = 64) -> np.ndarray:
    """A bright square moving right over a gradient; frame i's background level encodes i."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, :, :, 0] = 20 * i  # red level = frame index, robust to compression
        frames[i, :, :, 2] = np.linspace(0, 120, w, dtype=np.uint8)[None, :]
        x = 2 + 3 * i
        frames[i, 10:26, x : x + 16] = 255
    return frames


def test_mp4_round_trip_fps_and_content(tmp_path):
    frames = moving_square()
    out = write_video(tmp_path / "a.mp4", frames, fps=12)
    assert out.is_file() and not list(tmp_path.glob(".*tmp"))
    clip = read_video(out)
    assert clip.frames.shape == frames.shape and clip.frames.dtype == np.uint8
    assert clip.fps == pytest.approx(12)
    err = np.abs(clip.frames.astype(float) - frames).mean()
    assert err < 4.0, err


def test_select_frames_start_stride(tmp_path):
    frames = moving_square()
    write_video(tmp_path / "a.mp4", frames, fps=12)
    clip = read_video(tmp_path / "a.mp4", frames=3, start=2, stride=3)
    assert clip.num_frames == 3
    reds = clip.frames[:, 40, 60, 0].astype(int)  # background pixel: red = 20 * index
    np.testing.assert_allclose(reds, [40, 100, 160], atol=6)
    assert clip.fps == pytest.approx(4)
    with pytest.raises(InputError, match="no frames"):
        read_video(tmp_path / "a.mp4", start=100)


def test_odd_sizes_are_padded_for_h264(tmp_path):
    frames = moving_square(t=4, h=33, w=47)
    clip = read_video(write_video(tmp_path / "odd.mp4", frames, fps=8))
    assert clip.size == (34, 48)
    assert np.abs(clip.frames[:, :33, :47].astype(float) - frames).mean() < 5


def test_gif_and_frame_folder(tmp_path):
    frames = moving_square(t=5)
    clip = read_video(write_video(tmp_path / "a.gif", frames, fps=10))
    assert clip.frames.shape == frames.shape
    assert clip.fps == pytest.approx(10, rel=0.05)
    folder = write_frames(tmp_path / "frames", frames)
    assert len(list(folder.glob("*.png"))) == 5
    back = read_video(folder, start=1, stride=2)
    np.testing.assert_array_equal(back.frames, frames[1::2])  # PNG is lossless
    assert write_video(tmp_path / "again", frames, fps=5).is_dir()


def test_rotation_metadata_is_applied(tmp_path):
    import imageio_ffmpeg

    frames = moving_square(t=3, h=32, w=64)
    write_video(tmp_path / "land.mp4", frames, fps=8)
    rotated = tmp_path / "rot.mp4"
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-display_rotation", "90",
           "-i", str(tmp_path / "land.mp4"), "-c", "copy", str(rotated)]
    subprocess.run(cmd, check=True)
    clip = read_video(rotated)
    assert clip.size == (64, 32)
    # 90 degrees counter-clockwise: the top-left square of the source lands at the bottom-left.
    expected = np.rot90(frames[0], k=1)
    assert np.abs(clip.frames[0].astype(float) - expected).mean() < 5


def test_max_side_downsizes_and_limit_refuses(tmp_path):
    frames = moving_square(t=2, h=40, w=80)
    write_frames(tmp_path / "f", frames)
    clip = read_video(tmp_path / "f", max_side=40)
    assert clip.size == (20, 40)
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.zeros((8, 4100, 3), np.uint8)).save(big / "0.png")
    with pytest.raises(InputError, match="above the limit of 4096"):
        read_video(big)


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(InputError, match="cannot read video"):
        read_video(tmp_path / "junk.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        read_video(tmp_path / "empty")
    with pytest.raises(InputError, match="stride"):
        read_video(tmp_path / "empty", stride=0)
    with pytest.raises(InputError, match="use .mp4"):
        write_video(tmp_path / "x.avi", moving_square(t=1), fps=5)


def test_resize_crop_and_side_by_side():
    frames = moving_square(t=2, h=50, w=70)
    assert resize_crop(frames, 8).shape == (2, 48, 64, 3)
    assert resize_crop(frames, 32, size=(64, 64)).shape == (2, 64, 64, 3)
    assert resize_crop(frames, 8, size=100).shape == (2, 64, 96, 3)  # 71x100 -> crop to multiples
    with pytest.raises(InputError, match="multiple of 32"):
        resize_crop(frames, 32, size=(48, 64))
    with pytest.raises(InputError, match="too small"):
        resize_crop(frames[:, :20], 32)
    sbs = side_by_side(frames, frames[:, ::2, ::2])
    assert sbs.shape == (2, 50, 140, 3)
    for size in (100_000, (64, 8192), 4, (0, 64)):  # out of [multiple, MAX_SIDE]: refused before resizing
        with pytest.raises(InputError, match="out of range"):
            resize_crop(frames, 8, size=size)
    with pytest.raises(InputError, match="ints"):
        resize_crop(frames, 8, size=(64, 64, 3))


def test_resized_clip_above_the_memory_limit_is_refused(monkeypatch):
    import sanaflow.video as video

    monkeypatch.setattr(video, "MAX_BYTES", 3 * 64 * 96 * 3 - 1)  # just under 3 resized frames
    frames = moving_square(t=3, h=50, w=70)
    with pytest.raises(InputError, match="fewer frames"):
        resize_crop(frames, 8, size=100)
    assert resize_crop(frames[:2], 8, size=100).shape == (2, 64, 96, 3)


def test_check_video_target(tmp_path):
    from sanaflow.video import check_video_target

    assert check_video_target(tmp_path / "new" / "out.mp4") == tmp_path / "new" / "out.mp4"
    assert not (tmp_path / "new").exists()  # judged by its existing ancestor, nothing created
    assert not [p for p in tmp_path.iterdir()]  # and no probe file left there
    with pytest.raises(InputError, match="use .mp4"):
        check_video_target(tmp_path / "out.webm")
    (tmp_path / "taken.mp4").mkdir()
    with pytest.raises(InputError, match="folder of that name"):
        check_video_target(tmp_path / "taken.mp4")
    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(InputError, match="file of that name"):
        check_video_target(tmp_path / "afile")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "blocker").write_bytes(b"x")  # a file where a parent folder would go
    with pytest.raises(InputError, match="cannot write video"):
        check_video_target(tmp_path / "ro" / "blocker" / "out.mp4")


def test_without_pyav_video_files_are_refused_clearly_and_gif_and_folders_still_work(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    for path in (tmp_path / "a.mp4", tmp_path / "b.mkv"):
        with pytest.raises(InputError, match=r"PyAV.*sanaflow\[video\]"):
            write_video(path, frames, 8)
        assert not path.exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "c.mp4").write_bytes(b"\0" * 16)
    with pytest.raises(InputError, match="PyAV.*folder of frames"):
        read_video(tmp_path / "c.mp4")
    write_video(tmp_path / "d.gif", frames, 8)
    assert (tmp_path / "d.gif").stat().st_size > 0
    write_video(tmp_path / "e", frames, 8)
    assert read_video(tmp_path / "e").frames.shape == (2, 8, 8, 3)


@pytest.mark.parametrize("fps", [0, -2.0, float("nan"), float("inf"), float("-inf"), None, "24"])
def test_write_video_refuses_fps_that_is_not_finite_and_positive(tmp_path, fps):
    for name in ("x.mp4", "x.gif", "frames"):
        with pytest.raises(InputError, match="fps must be a finite number above 0"):
            write_video(tmp_path / name, moving_square(t=2), fps=fps)
    assert not any(tmp_path.iterdir())


def test_frame_folder_with_unpadded_numbers_is_read_in_number_order(tmp_path):
    frames = moving_square(t=12)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames, start=1):  # frame1.png ... frame12.png, as ffmpeg's %d.png writes
        Image.fromarray(f).save(folder / f"frame{i}.png")
    np.testing.assert_array_equal(read_video(folder).frames, frames)  # not 1, 10, 11, 12, 2, ...


@pytest.mark.parametrize("fps", [15, 24, 8, 29.97])
def test_gif_durations_keep_the_average_frame_rate(tmp_path, fps):
    frames = np.random.default_rng(0).integers(0, 255, (30, 8, 8, 3), dtype=np.uint8)  # no two frames alike
    path = write_video(tmp_path / "a.gif", frames, fps=fps)
    durations = []
    with Image.open(path) as im:
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
    assert len(durations) == 30 and all(d % 10 == 0 for d in durations)  # GIF stores centiseconds
    # Each frame ends within 5 ms of its exact time, so 15 fps plays as 15, not 1000 / 60 or 1000 / 70.
    ends = np.cumsum(durations)
    exact = 1000 * np.arange(1, 31) / fps
    assert np.abs(ends - exact).max() <= 5 + 1e-9
    if fps == 15:
        assert durations[:3] == [70, 60, 70]
