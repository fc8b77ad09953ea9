"""`sanaflow generate` / `sanaflow info` end to end on a tiny random model, and their error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from sanaflow.cli import main
from tiny_sana import save_tiny_sana


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_sana(tmp_path_factory.mktemp("cli") / "sana", sample_size=8)


def test_generate_writes_pngs_with_metadata(model, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["generate", "a red star", "a blue circle", "--model", str(model), "--size", "64x32",
               "--steps", "2", "--cfg", "3", "--seed", "7", "-n", "2", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4
    metas = [Image.open(p).text for p in pngs]
    assert [m["prompt"] for m in metas] == ["a red star", "a red star", "a blue circle", "a blue circle"]
    assert [int(m["seed"]) for m in metas] == [7, 8, 9, 10]
    m = metas[0]
    assert m["steps"] == "2" and float(m["guidance_scale"]) == 3.0 and m["sampler"] == "dpm++2m"
    assert m["model"] == str(model)
    assert json.loads(m["sanaflow"])["seed"] == 7
    assert Image.open(pngs[0]).size == (64, 32)
    assert (out / "config.yaml").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_generate_same_seed_same_bytes(model, tmp_path):
    for d in ("a", "b"):
        assert main(["generate", "a cat", "--model", str(model), "--size", "32x32", "--steps", "2",
                     "--seed", "3", "--out", str(tmp_path / d), "--device", "cpu"]) == 0
    a = next((tmp_path / "a").glob("*.png")).read_bytes()
    b = next((tmp_path / "b").glob("*.png")).read_bytes()
    assert a == b


def test_out_png_file_for_one_image(model, tmp_path, capsys):
    target = tmp_path / "sub" / "star.png"
    assert main(["generate", "a red star", "--model", str(model), "--size", "32x32", "--steps", "1",
                 "--seed", "5", "--out", str(target), "--device", "cpu"]) == 0
    assert target.is_file() and Image.open(target).text["prompt"] == "a red star"
    assert sorted(p.name for p in target.parent.iterdir()) == ["star.png"]  # no config.yaml, no temp files
    assert capsys.readouterr().out.strip() == str(target)
    folder = tmp_path / "looks.png"  # an existing folder keeps folder semantics
    folder.mkdir()
    assert main(["generate", "a cat", "--model", str(model), "--size", "32x32", "--steps", "1",
                 "--out", str(folder), "--device", "cpu"]) == 0
    assert len(list(folder.glob("*.png"))) == 1 and (folder / "config.yaml").is_file()


@pytest.mark.parametrize("args, needle", [
    (["a cat", "a dog", "--out", "two.png"], "makes 2 images"),
    (["a cat", "-n", "3", "--out", "three.png"], "makes 3 images"),
    (["a cat", "--out", "cat.jpg"], "PNG"),
])
def test_out_file_errors(model, tmp_path, args, needle):
    args = [a if not a.endswith((".png", ".jpg")) else str(tmp_path / a) for a in args]
    r = _cli("generate", *args, "--model", str(model), "--steps", "1")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_generate_shows_step_progress_unless_quiet(model, tmp_path, capsys):
    args = ["generate", "a cat", "--model", str(model), "--size", "32x32", "--steps", "3", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err  # not a tty here: the bars show anyway, as `edit`'s do
    assert "3/3" in err and "images" in err
    assert main([*args, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_unknown_sampler_lists_only_samplers_the_model_takes(model, tmp_path, capsys):
    assert main(["generate", "a cat", "--model", str(model), "--sampler", "DPM++2M", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'dpm++2m'" in err, err
    assert "choose from: dpm++2m, euler;" in err and "SANA-Sprint models always use scm" in err


def test_prompts_file(model, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red star\n\na blue square\n")
    out = tmp_path / "out"
    assert main(["generate", "--prompts-file", str(f), "--model", str(model), "--size", "32x32",
                 "--steps", "1", "--out", str(out), "--device", "cpu"]) == 0
    assert len(list(out.glob("*.png"))) == 2


def test_info(model, capsys):
    assert main(["info", str(model)]) == 0
    text = capsys.readouterr().out
    assert "transformer" in text and "M parameters" in text and "num_layers: 2" in text


def _cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sanaflow.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["generate", ""], "empty prompt"),
        (["generate"], "no prompt"),
        (["generate", "a cat", "--size", "33x32"], "multiple of 32"),
        (["generate", "a cat", "--size", "8192x32"], "limit"),
        (["generate", "a cat", "--size", "4120x32"], "above the limit"),  # not "try 4128", above it
        (["generate", "a cat", "--seed", str(2**64 - 1), "-n", "2"], "runs past the largest seed"),
        (["generate", "a cat", "--size", "big"], "WIDTHxHEIGHT"),
        (["generate", "a cat", "--sampler", "heun9"], "sampler"),
        (["generate", "a cat", "--model", "/no/such/folder"], "not found"),
        (["generate", "a cat", "--cfg", "nan"], "guidance_scale must be a finite number"),
        (["generate", "a cat", "--cfg", "-1"], "guidance_scale must be a finite number"),
    ],
)
def test_bad_input_one_line_exit_2(args, needle, tmp_path, model):
    out = tmp_path / "out"
    if "--model" not in args:
        args = [*args, "--model", str(model)]
    r = _cli(*args, "--out", str(out))
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert not out.exists() or not list(out.iterdir())


def test_unwritable_output_dir(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli("generate", "a cat", "--model", str(model), "--out", str(blocker / "sub"), "--steps", "1")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "output folder" in r.stderr


def test_config_overrides_and_resolved_config(model, tmp_path):
    import yaml

    out = tmp_path / "out"
    assert main(["generate", "a cat", "--model", str(model), "--size", "32x32", "--set", "sampling.steps=1",
                 "--set", "sampling.seed=5", "--out", str(out), "--device", "cpu"]) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["sampling"]["steps"] == 1 and resolved["sampling"]["seed"] == 5
    assert resolved["prompts"] == ["a cat"] and resolved["width"] == 32
    assert Image.open(next(out.glob("*.png"))).text["steps"] == "1"


def test_misspelt_override_key(model, tmp_path):
    r = _cli("generate", "a cat", "--model", str(model), "--set", "sampling.stpes=3", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "stpes" in r.stderr and "steps" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _copy_with(model, tmp_path, edit_config=None, edit_weights=None):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(model, folder)
    cfg_path = folder / "transformer" / "config.json"
    if edit_config:
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **edit_config}))
    if edit_weights:
        w = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        save_file({k: edit_weights(v) for k, v in load_file(str(w)).items()}, str(w))
    return folder


@pytest.mark.parametrize("change, needle", [({"num_attention_heads": "abc"}, "wrong value type"),
                                            ({"num_layers": -3}, "no negative"), ({"foo_bar": 1}, "unknown key"),
                                            ({"patch_size": 0}, "sizes and counts must be >= 1")])
def test_info_and_generate_refuse_a_bad_config_json(model, tmp_path, capsys, change, needle):
    folder = _copy_with(model, tmp_path, edit_config=change)
    for argv in (["info", str(folder)], ["generate", "a cat", "--model", str(folder), "--out", str(tmp_path / "o")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()  # a failed load leaves no output folder


def test_generate_refuses_nan_weights_instead_of_a_black_image(model, tmp_path, capsys):
    folder = _copy_with(model, tmp_path, edit_weights=lambda v: v * float("nan") if v.is_floating_point() else v)
    out = tmp_path / "o"
    assert main(["generate", "a cat", "--model", str(folder), "--out", str(out), "--steps", "1"]) == 2
    assert "NaN" in capsys.readouterr().err
    assert not out.exists() or not list(out.glob("*.png"))


def test_info_refuses_a_malformed_model_index(model, tmp_path, capsys):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder": []}))
    assert main(["info", str(folder)]) == 2
    assert "should be [library, class]" in capsys.readouterr().err


def test_info_of_a_single_component_folder(model, capsys):
    assert main(["info", str(model / "transformer")]) == 0
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first.startswith(f"model: {model / 'transformer'}") and second.startswith("[component]")
