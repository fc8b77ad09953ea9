"""`sanaflow shapes ...` and `sanaflow eval ...`: outputs, and one-line errors with exit status 2."""

import json

import numpy as np
from PIL import Image

from sanaflow.cli import main


def _one_line_error(capsys, argv, *needles):
    try:
        status = main(argv)
    except SystemExit as e:  # argparse usage errors exit from inside parse_args
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_sample_then_eval_images(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["shapes", "sample", "--n", "18", "--out", str(out), "--split", "eval", "--size", "128"]) == 0
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 18 and all((out / r["file"]).is_file() for r in rows)
    assert {r["category"] for r in rows} == {
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "color_attr",
    }
    assert any(r["held_out"] for r in rows)
    capsys.readouterr()
    assert main(["eval", "images", str(out)]) == 0
    table = capsys.readouterr().out
    assert "overall" in table and "held_out" in table
    report = json.loads((out / "shapes_scores.json").read_text())
    assert report["summary"]["overall"] == 1.0 and len(report["results"]) == 18
    # A wrong image for one prompt costs exactly that prompt.
    first = rows[3]  # colors
    Image.fromarray(np.full((128, 128, 3), 245, np.uint8)).save(out / first["file"])
    assert main(["eval", "images", str(out), "--out", str(tmp_path / "s.json")]) == 0
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["summary"]["per_prompt"] == 17 / 18
    assert not report["results"][3]["correct"] and "found" in report["results"][3]["reason"]


def test_eval_images_writes_null_not_nan_for_an_empty_group(tmp_path, capsys):
    out = tmp_path / "train"
    assert main(["shapes", "sample", "--n", "3", "--out", str(out), "--split", "train", "--size", "64"]) == 0
    assert main(["eval", "images", str(out)]) == 0  # the train split has no held-out prompts

    def no_nan(name):
        raise AssertionError(f"shapes_scores.json holds {name}, which is not JSON")

    report = json.loads((out / "shapes_scores.json").read_text(), parse_constant=no_nan)
    assert report["summary"]["held_out"] == {"n": 0, "accuracy": None}
    assert report["summary"]["seen"]["n"] == 3


def test_prompts_only_and_train_split(tmp_path):
    assert main(["shapes", "sample", "--n", "5", "--out", str(tmp_path / "p"), "--prompts-only"]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["prompts.jsonl"]
    rows = [json.loads(line) for line in (tmp_path / "p" / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and not any(r["held_out"] for r in rows)


def test_video_then_eval_video(tmp_path, capsys):
    src = tmp_path / "src.mp4"
    assert main(["shapes", "video", "--out", str(src), "--seed", "2", "--frames", "6", "--size", "96"]) == 0
    assert (tmp_path / "src.json").is_file()
    assert main(["eval", "video", str(src), "--source", str(src), "--edit", "0:shape=star"]) == 0
    metrics = json.loads((tmp_path / "src.metrics.json").read_text())
    assert metrics["source_warp_error_gt"] < 1e-3 and metrics["frames"] == 6
    assert metrics["edit"] == {"0": {"shape": "star"}}


def test_bad_input_one_line_exit_2(tmp_path, capsys):
    empty = tmp_path / "images"
    empty.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(empty / "a.png")
    _one_line_error(capsys, ["eval", "images", str(empty)], "no prompts.jsonl")

    bad = tmp_path / "bad"
    assert main(["shapes", "sample", "--n", "2", "--out", str(bad), "--split", "eval", "--size", "64"]) == 0
    capsys.readouterr()
    rows = (bad / "prompts.jsonl").read_text().splitlines()
    row = json.loads(rows[1])
    row["scene"]["objects"][0]["color"] = "grene"
    (bad / "prompts.jsonl").write_text(rows[0] + "\n" + json.dumps(row) + "\n")
    _one_line_error(
        capsys, ["eval", "images", str(bad)], "unknown colour 'grene'", "did you mean 'green'", ":2:"
    )
    good = json.loads(rows[1])
    for change, needle in (({"file": 5}, "'file' must be an image file name"),
                           ({"files": []}, "non-empty list"), ({"files": "a.png"}, "non-empty list"),
                           ({"held_out": "no"}, "'held_out' must be true or false")):
        (bad / "prompts.jsonl").write_text(rows[0] + "\n" + json.dumps({**good, **change}) + "\n")
        _one_line_error(capsys, ["eval", "images", str(bad)], needle, ":2:")
    (bad / "prompts.jsonl").write_bytes(b"\xff\xfe\x00binary")
    _one_line_error(capsys, ["eval", "images", str(bad)], "cannot read")

    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 10)
    src = tmp_path / "src.mp4"
    assert main(["shapes", "video", "--out", str(src), "--frames", "3", "--size", "64"]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["eval", "video", str(junk), "--source", str(src)], "junk.mp4")
    _one_line_error(capsys, ["eval", "video", str(src), "--source", str(junk)], "no scene track")
    track = json.loads((tmp_path / "src.json").read_text())
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(src.read_bytes())
    for change, needle in (({"objects": "x"}, "'objects' must be a list"), ({"objects": [5]}, "'objects' must be a list"),
                           ({"size": [0, 0]}, "track 'size'"), ({"fps": float("nan")}, "'fps' must be"),
                           ({"frames": -1}, "'frames' must be an integer >= 1"),
                           ({"pan": [[0, 0]]}, "'pan' must be a list of 3 pairs")):
        (tmp_path / "corrupt.json").write_text(json.dumps({**track, **change}))
        _one_line_error(capsys, ["eval", "video", str(src), "--source", str(corrupt)], needle)
    del track["objects"]
    (tmp_path / "corrupt.json").write_text(json.dumps(track))
    _one_line_error(capsys, ["eval", "video", str(src), "--source", str(corrupt)], "lacks objects")
    _one_line_error(
        capsys, ["eval", "video", str(src), "--source", str(src), "--edit", "0:colour=red"], "--edit"
    )
    _one_line_error(capsys, ["shapes", "sample", "--n", "0", "--out", str(tmp_path / "x")], "--n")
    _one_line_error(
        capsys,
        ["shapes", "sample", "--n", "2", "--out", str(tmp_path / "x"), "--split", "test"],
        "invalid choice",
    )


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_eval_out_is_checked_before_scoring_and_never_overwrites_inputs(tmp_path, capsys, monkeypatch):
    import sanaflow.shapes as shapes

    folder = tmp_path / "ok"
    assert main(["shapes", "sample", "--n", "2", "--out", str(folder), "--split", "eval", "--size", "64"]) == 0
    src = tmp_path / "v.mp4"
    assert main(["shapes", "video", "--out", str(src), "--frames", "3", "--size", "64"]) == 0
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    before = _files(tmp_path)

    def boom(*args, **kwargs):
        raise AssertionError("scored before --out was checked")

    monkeypatch.setattr(shapes, "score", boom)
    monkeypatch.setattr(shapes, "load_video", boom)
    capsys.readouterr()
    for out, needle in [
        (tmp_path / "adir", "is a folder"),
        (tmp_path / "afile" / "x.json", "is a file"),
        ("", "--out is empty"),
        (folder / "prompts.jsonl", "is an input"),
        (folder / "00000.png", "is an input"),
    ]:
        _one_line_error(capsys, ["eval", "images", str(folder), "--out", str(out)], needle)
    for out, needle in [
        (tmp_path / "adir", "is a folder"),
        (tmp_path / "afile" / "x.json", "is a file"),
        ("", "--out is empty"),
        (src, "is an input"),
        (tmp_path / "v.json", "is an input"),  # the source's scene track
    ]:
        _one_line_error(capsys, ["eval", "video", str(src), "--source", str(src), "--out", str(out)], needle)
    (folder / "shapes_scores.json").mkdir()  # the default report path is checked too
    _one_line_error(capsys, ["eval", "images", str(folder)], "is a folder")
    (folder / "shapes_scores.json").rmdir()
    assert _files(tmp_path) == before


def test_shapes_out_and_fps_are_checked_before_rendering(tmp_path, capsys, monkeypatch):
    import sanaflow.shapes as shapes

    def boom(*args, **kwargs):
        raise AssertionError("rendered before the arguments were checked")

    monkeypatch.setattr(shapes, "random_video", boom)
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "v.mp4")
    for fps in ("nan", "inf", "-inf", "0", "-1"):
        _one_line_error(capsys, ["shapes", "video", "--out", out, f"--fps={fps}"], "--fps", "finite")
    (tmp_path / "x.mp4").mkdir()
    _one_line_error(capsys, ["shapes", "video", "--out", str(tmp_path / "x.mp4")], "folder of that name")
    (tmp_path / "y.json").mkdir()  # where the scene track of y.mp4 goes
    _one_line_error(capsys, ["shapes", "video", "--out", str(tmp_path / "y.mp4")], "y.json", "in the way")
    (tmp_path / "afile").write_text("x")
    _one_line_error(capsys, ["shapes", "video", "--out", str(tmp_path / "afile" / "v.mp4")], "is a file")
    _one_line_error(capsys, ["shapes", "sample", "--n", "2", "--out", ""], "--out is empty")
    _one_line_error(capsys, ["shapes", "sample", "--n", "2", "--out", str(tmp_path / "afile" / "s")], "is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "x.mp4", "y.json"]  # nothing written


def test_sample_interrupted_leaves_no_images_without_prompts(tmp_path, monkeypatch):
    import sanaflow.shapes as shapes_pkg

    calls = []

    def render_then_fail(scene, size):
        calls.append(scene)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return np.zeros((size, size, 3), np.uint8)

    monkeypatch.setattr(shapes_pkg, "render", render_then_fail)
    out = tmp_path / "data"
    assert main(["shapes", "sample", "--n", "5", "--out", str(out), "--size", "32"]) == 130  # Ctrl-C
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no --out, no staging folder
    (out).mkdir()
    (out / "mine.txt").write_text("keep")
    monkeypatch.undo()
    assert main(["shapes", "sample", "--n", "2", "--out", str(out), "--size", "32"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "mine.txt", "prompts.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
