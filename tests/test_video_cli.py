"""`sanaflow edit` / `sanaflow invert` end to end on a tiny random SD pipeline folder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sanaflow.cli import main
from sanaflow.video import read_video, write_video

# one_thread and sd_folder (a tiny SD folder with a ControlNet) come from conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    frames = np.zeros((8, 16, 24, 3), np.uint8)
    frames[..., 1] = 60
    for i in range(8):
        frames[i, 4:12, 2 + i : 10 + i] = (230, 40, 40)
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames, fps=8)


def test_edit_end_to_end_and_cache_reuse(sd_folder, video, tmp_path, capsys):
    out = tmp_path / "edit.mp4"
    sbs = tmp_path / "sbs.mp4"
    args = ["edit", str(video), "--prompt", "a blue square", "--model", str(sd_folder), "--steps", "2",
            "--batch-size", "4", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--quiet"]
    assert main([*args, "--side-by-side", str(sbs), "--reconstruct"]) == 0
    printed = capsys.readouterr().out
    assert "cached inversion" in printed
    edited = read_video(out)
    assert edited.frames.shape == (8, 16, 24, 3)
    assert edited.fps == pytest.approx(8)
    assert read_video(sbs).frames.shape == (8, 16, 48, 3)
    assert (tmp_path / "edit_reconstruction.mp4").is_file()
    # second edit of the same video: the inversion comes from the cache (with cross-attention control)
    assert main([*args, "--mode", "per-frame", "--frames", "8", "--cross-attn", "0.5"]) == 0
    assert "reused inversion" in capsys.readouterr().out
    assert main([*args, "--local-blend", "0.5"]) == 0  # local blending (off by default on SD)
    assert "reused inversion" in capsys.readouterr().out
    # re-weighted control and output propagation along the source's flow (both off by default on SD)
    assert main([*args, "--cross-attn", "0.5", "--cross-reweight", "3", "--output-propagation", "0.5",
                 "--output-propagation-steps", "0.5"]) == 0
    assert "reused inversion" in capsys.readouterr().out and read_video(out).frames.shape == (8, 16, 24, 3)


def test_edit_with_controlnet_and_flow(sd_folder, video, tmp_path):
    out = tmp_path / "cn.gif"
    rc = main(["edit", str(video), "--prompt", "a blue square", "--model", str(sd_folder), "--steps", "2",
               "--frames", "4", "--stride", "2", "--controlnet", "canny", "--correspondence", "flow",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--quiet"])
    assert rc == 0
    assert read_video(out).num_frames == 4


def test_invert_writes_reconstruction(sd_folder, video, tmp_path, capsys):
    out = tmp_path / "recon.mp4"
    rc = main(["invert", str(video), "--model", str(sd_folder), "--steps", "2", "--inversion-steps", "4",
               "--inversion-batch-size", "8",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--quiet"])
    assert rc == 0 and read_video(out).num_frames == 8
    assert "cached inversion" in capsys.readouterr().out


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sanaflow: error:"), err
    assert match in err, err


def test_bad_inputs_exit_2_with_one_line(sd_folder, video, tmp_path, capsys):
    base = ["--model", str(sd_folder), "--cache-dir", str(tmp_path / "c"), "--quiet"]
    _one_line_error(capsys, ["edit", str(tmp_path / "missing.mp4"), "--prompt", "x", *base], "does not exist")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00garbage" * 50)
    _one_line_error(capsys, ["edit", str(junk), "--prompt", "x", *base], "cannot read video")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, ["invert", str(empty), *base], "holds no images")
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.zeros((8, 4200, 3), np.uint8)).save(big / "f0.png")
    _one_line_error(capsys, ["edit", str(big), "--prompt", "x", *base], "above the limit")
    _one_line_error(capsys, ["edit", str(video), "--prompt", "x", "--model", str(tmp_path / "nomodel")],
                    "nomodel")
    _one_line_error(capsys, ["edit", str(video), "--prompt", "x", "--frames", "0", *base], "--frames")
    _one_line_error(capsys, ["edit", str(video), "--prompt", "x", "--size", "100000", *base], "--size must be")
    _one_line_error(capsys, ["edit", str(video), "--prompt", " ", *base], "non-empty --prompt")


def test_bad_output_targets_fail_before_any_work(sd_folder, video, tmp_path, capsys, monkeypatch):
    import sanaflow.commands.video as cmd

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(cmd, "_pipeline", no_model)
    base = ["--model", str(sd_folder), "--cache-dir", str(tmp_path / "c"), "--quiet"]
    _one_line_error(capsys, ["edit", str(video), "--prompt", "x", "--out", str(tmp_path / "o.xyz"), *base],
                    "use .mp4")
    _one_line_error(capsys, ["edit", str(video), "--prompt", "x", "--side-by-side", str(tmp_path / "s.avi"),
                             *base], "use .mp4")
    _one_line_error(capsys, ["invert", str(video), "--out", str(tmp_path / "r.webm"), *base], "use .mp4")
    # Every edit flag is judged before the video is read or an output folder is made.
    out = ["--out", str(tmp_path / "new" / "o.mp4")]
    for flags, message in ((["--steps", "0"], "--steps must be at least 1"),
                           (["--batch-size", "0"], "--batch-size must be at least 1"),
                           (["--cross-attn", "1.5"], "--cross-attn (cross_attention) must lie in [0, 1]"),
                           (["--mode", "tokenflow-sdedit", "--strength", "0.01"], "leaves no step")):
        _one_line_error(capsys, ["edit", str(tmp_path / "missing.mp4"), "--prompt", "x", *flags, *out, *base], message)
    _one_line_error(capsys, ["invert", str(tmp_path / "missing.mp4"), "--steps", "0", *out, *base],
                    "--steps must be at least 1")
    assert not (tmp_path / "c").exists() and not (tmp_path / "new").exists()


def test_bad_cross_attention_and_blend_fractions_exit_2(sd_folder, video, tmp_path, capsys):
    base = ["--model", str(sd_folder), "--cache-dir", str(tmp_path / "c"), "--steps", "2", "--quiet"]
    for bad in ("1.5", "-0.2", "nan"):
        _one_line_error(capsys, ["edit", str(video), "--prompt", "x", "--cross-attn", bad, *base],
                        "--cross-attn (cross_attention) must lie in [0, 1]")
    for bad in ("1", "-0.2", "nan"):
        _one_line_error(capsys, ["edit", str(video), "--prompt", "x", "--local-blend", bad, *base],
                        "--local-blend must lie in [0, 1)")
    for bad in ("25", "-1"):
        _one_line_error(capsys, ["edit", str(video), "--prompt", "x", "--cross-attn", "0.5", "--cross-reweight", bad,
                                 *base], "--cross-reweight must lie in [0, 20]")
    _one_line_error(capsys, ["edit", str(video), "--prompt", "x", "--output-propagation", "1.5", *base],
                    "--output-propagation (output_propagation) must lie in [0, 1]")
    with pytest.raises(SystemExit) as exited:  # not a number: argparse's own usage error
        main(["edit", str(video), "--prompt", "x", "--cross-attn", "half", *base])
    assert exited.value.code == 2 and "--cross-attn: invalid float value" in capsys.readouterr().err


def test_a_frame_folder_given_as_dot_writes_beside_it(sd_folder, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"f{i}.png")
    monkeypatch.chdir(folder)
    assert main(["invert", ".", "--model", str(sd_folder), "--steps", "1", "--cache-dir", str(tmp_path / "c"),
                 "--quiet"]) == 0
    assert read_video(tmp_path / "shots_reconstruction.mp4").num_frames == 3  # named after the folder


def test_cache_dir_fps_size_and_duplicate_outputs_fail_before_any_work(sd_folder, video, tmp_path, capsys,
                                                                       monkeypatch):
    import sanaflow.commands.video as cmd
    import sanaflow.video

    def no_work(*a, **k):
        raise AssertionError("the video was read or the model loaded before the options were checked")

    monkeypatch.setattr(cmd, "_pipeline", no_work)
    monkeypatch.setattr(sanaflow.video, "read_video", no_work)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    base = ["--model", str(sd_folder), "--quiet"]
    for command in (["edit", str(video), "--prompt", "x"], ["invert", str(video)]):
        for cache in (blocker, blocker / "sub", "/proc/nope/cache"):
            _one_line_error(capsys, [*command, "--cache-dir", str(cache), *base], "--cache-dir")
        for fps in ("0", "-5", "nan"):
            _one_line_error(capsys, [*command, "--fps", fps, "--cache-dir", str(tmp_path / "c"), *base],
                            "--fps must be a finite number above 0")
    # --size knows the model's multiple (32 for the embedded SANA model), so 16 fails here, not after loading.
    _one_line_error(capsys, ["edit", str(video), "--prompt", "x", "--size", "16", "--cache-dir",
                             str(tmp_path / "c"), "--quiet"], "--size must be in [32, 4096]")
    base = [*base, "--cache-dir", str(tmp_path / "c")]
    for out, sbs in (("o.mp4", "o.mp4"), ("o.gif", "new/../o.gif"), ("frames", "frames"),
                     ("frames", "frames/s.mp4"), ("frames/o.mp4", "frames")):
        _one_line_error(capsys, ["edit", str(video), "--prompt", "x", "--out", str(tmp_path / out),
                                 "--side-by-side", str(tmp_path / sbs), *base], "--side-by-side and --out")
    _one_line_error(capsys, ["edit", str(video), "--prompt", "x", "--out", str(tmp_path / "o.mp4"), "--reconstruct",
                             "--side-by-side", str(tmp_path / "o_reconstruction.mp4"), *base], "both write")
    assert not (tmp_path / "c").exists() and not (tmp_path / "frames").exists()
