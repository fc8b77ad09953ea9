"""Bad user input to sanaflow.quant and sanaflow.shapes raises a SanaflowError that says what is allowed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sanaflow import quant
from sanaflow import shapes as S
from sanaflow.errors import CheckpointError, ConfigError, InputError
from sanaflow.models.sana_transformer import SanaTransformer

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
            num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=16,
            mlp_ratio=2.5, sample_size=8)


def tiny_model() -> SanaTransformer:
    torch.manual_seed(0)
    return SanaTransformer(**TINY).eval()


# -- quantization ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant") / "q"
    quant.save_quantized(quant.quantize_transformer(tiny_model(), "int8"), folder)
    return folder


def with_layers(saved, tmp_path, change) -> str:
    """A copy of the saved folder whose quantization entry's `layers` went through `change`."""
    folder = tmp_path / "q"
    shutil.copytree(saved, folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config["_sanaflow_quantization"]["layers"])
    path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("mode", [None, ["int8"], 8])
def test_quantize_mode_must_be_a_known_string(mode):
    with pytest.raises(ConfigError, match="quantization mode must be a string.*fp8, int8"):
        quant.quantize_transformer(tiny_model(), mode)


def test_quantize_needs_a_module():
    with pytest.raises(InputError, match="torch.nn.Module.*got str"):
        quant.quantize_transformer("abc", "int8")
    with pytest.raises(InputError, match="torch.nn.Module"):
        quant.quantizable_modules(3, "int8")
    with pytest.raises(InputError, match="no parameters"):
        quant.quantize_transformer(torch.nn.Identity(), "int8")


def test_load_quantized_checks_torch_dtype_like_from_pretrained(saved):
    for dtype in ("float16", torch.int8):
        with pytest.raises(ConfigError, match="floating-point torch.dtype"):
            quant.load_quantized(SanaTransformer, saved, torch_dtype=dtype)
        with pytest.raises(ConfigError, match="floating-point torch.dtype"):
            SanaTransformer.from_pretrained(saved, torch_dtype=dtype)
    model = quant.load_quantized(SanaTransformer, saved, torch_dtype=torch.float16, device="cpu")
    assert model.proj_out.weight.dtype == torch.float16 and quant.is_quantized(model) == "int8"


@pytest.mark.parametrize(
    "name, kind, message",
    [
        ("transformer_blocks.0.norm1", "linear", r"'transformer_blocks.0.norm1' is marked 'linear'.*LayerNorm"),
        ("", "linear", "layer '' does not exist"),
        ("transformer_blocks.0.attn1.to_q", "bogus", r"'bogus'; expected one of linear, pointwise_conv"),
        ("transformer_blocks.0.attn1.to_q", None, r"None; expected one of linear, pointwise_conv"),
        ("transformer_blocks.0.ff.conv_point", "linear", r"conv_point' is marked 'linear'.*Conv2d, not an nn.Linear"),
        ("transformer_blocks.0.ff.conv_depth", "pointwise_conv", r"conv_depth' is marked 'pointwise_conv'.*1x1"),
        ("transformer_blocks.0.attn1.to_k", "pointwise_conv", r"to_k' is marked 'pointwise_conv'.*Linear"),
    ],
)
def test_corrupt_layer_entries_are_checkpoint_errors_at_load(saved, tmp_path, name, kind, message):
    folder = with_layers(saved, tmp_path, lambda layers: layers.__setitem__(name, kind))
    with pytest.raises(CheckpointError, match=message):
        SanaTransformer.from_pretrained(folder)


# -- shapes: edits and objects ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def video():
    return S.random_video(0, frames=3, size=32, num_objects=2)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({0.7: {"color": "red"}}, r"object indices, integers in 0\.\.1.*got float 0\.7"),
        ({"a": {"color": "red"}}, r"object indices.*got str 'a'"),
        ({None: {"color": "red"}}, r"object indices.*got NoneType None"),
        ({True: {"color": "red"}}, r"object indices.*got bool True"),
        ({5: {"color": "red"}}, r"integers in 0\.\.1 for this video; got int 5"),
        ([0], r"an edit is a dict .*got list"),
        ("0:color=red", r"an edit is a dict .*got str"),
        ({0: "red"}, r"edit of object 0: expected a dict like \{'color'"),
        ({0: {"color": ["red"]}}, r"color must be a name \(a string\), got list.*choose from: red"),
        ({0: {"shape": 3}}, r"shape must be a name \(a string\), got int.*choose from: circle"),
        ({0: {"color": "grene"}}, r"unknown color 'grene' \(did you mean 'green'\?\)"),
        ({0: {"colour": "red"}}, r"'color' and/or 'shape', got \['colour'\]"),
    ],
)
def test_bad_edits_are_input_errors(video, edit, message):
    with pytest.raises(InputError, match=message):
        S.video_caption(video, edit)
    with pytest.raises(InputError, match=message):
        S.video_metrics(video.frames, video, edit)


def test_valid_edits_still_work(video):
    assert S.video_caption(video, {np.int64(1): {"shape": "star"}}) == S.video_caption(video, {1: {"shape": "star"}})
    assert S.video_caption(video, None) == S.video_caption(video, {}) == S.video_caption(video)
    assert S.edit_valid_mask(video, {0: {"shape": "star"}}, video.valid).shape == video.valid.shape
    with pytest.raises(InputError, match="shape of the video's flow mask"):
        S.edit_valid_mask(video, {0: {"shape": "star"}}, video.valid[:1])


@pytest.mark.parametrize("color", [["red"], {"r": 1}, None])
def test_shape_object_names_must_be_strings(color):
    with pytest.raises(ConfigError, match=r"colour must be a string.*choose from: blue"):
        S.ShapeObject("circle", color, "small", 0.5, 0.5)


# -- shapes: random_video arguments ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(size=(64,)), r"size must be an int or a \(height, width\) pair of ints, got tuple"),
        (dict(size=64.0), r"pair of ints, got float 64\.0"),
        (dict(size="64"), r"pair of ints, got str '64'"),
        (dict(size=(64, 64.5)), r"pair of ints"),
        (dict(size=100000), r"video sides must be in \[16, 8192\], got 100000x100000"),
        (dict(size=8), r"video sides must be in \[16, 8192\]"),
        (dict(num_objects=2.5), r"num_objects must be None or an integer in \[1, 4\], got 2\.5"),
        (dict(num_objects="2"), r"num_objects must be None or an integer in \[1, 4\], got '2'"),
        (dict(num_objects=5), r"num_objects must be None or an integer in \[1, 4\]"),
        (dict(fps=0), "fps must be a finite number above 0, got 0"),
        (dict(fps=-1), "fps must be a finite number above 0, got -1"),
        (dict(fps=float("nan")), "fps must be a finite number above 0, got nan"),
        (dict(fps="8"), "fps must be a finite number above 0"),
        (dict(pan="yes"), "pan must be True or False, got 'yes'"),
    ],
)
def test_random_video_arguments(kwargs, message):
    with pytest.raises(InputError, match=message):
        S.random_video(0, frames=2, **{"size": 32, **kwargs})


def test_random_video_valid_arguments_still_work():
    v = S.random_video(0, frames=2, size=(32, 48), num_objects=np.int64(1), pan=np.bool_(True), fps=np.float64(5))
    assert v.frames.shape == (2, 32, 48, 3) and v.num_objects == 1 and v.fps == 5.0
    assert S.random_video(0, frames=2, size=[32, np.int64(32)], fps=12).frames.shape == (2, 32, 32, 3)


# -- shapes: render, score, exact_match ------------------------------------------------------------


def test_render_needs_a_scene_and_a_fitting_out():
    scene = S.sample_scene(1)
    with pytest.raises(InputError, match=r"render needs a Scene \(from sample_scene.*got str 'a red circle'"):
        S.render("a red circle", 64)
    with pytest.raises(InputError, match=r"uint8 array of shape \(64, 64, 3\).*got uint8 \(32, 32, 3\)"):
        S.render(scene, 64, out=np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(InputError, match=r"uint8 array of shape \(64, 64, 3\).*got float32 \(64, 64, 3\)"):
        S.render(scene, 64, out=np.zeros((64, 64, 3), np.float32))
    with pytest.raises(InputError, match="not C-contiguous"):
        S.render(scene, 64, out=np.zeros((64, 128, 3), np.uint8)[:, ::2])
    with pytest.raises(InputError, match="got list"):
        S.render(scene, 64, out=[0])
    out = np.zeros((64, 48, 3), np.uint8)
    assert S.render(scene, (64, 48), out=out) is out
    assert np.array_equal(out, S.render(scene, (64, 48)))
    assert np.array_equal(S.render_batch([scene], (64, 48))[0], out)


def test_score_and_exact_match_check_their_arguments():
    scene = S.sample_scene(1)
    image = S.render(scene, 64)
    with pytest.raises(InputError, match="score needs a Scene.*got NoneType"):
        S.score(image, None)
    with pytest.raises(InputError, match=r"score needs a list of Detection \(from detect\(image\)\)"):
        S.score(image, scene, detections="x")
    with pytest.raises(InputError, match="exact_match needs a list of Detection.*got NoneType"):
        S.exact_match(None, scene)
    with pytest.raises(InputError, match="exact_match needs a Scene"):
        S.exact_match([], None)
    dets = S.detect(image)
    assert S.exact_match(dets, scene) in (True, False)
    assert S.score(image, scene, detections=dets) == S.score(image, scene)


# -- shapes: video_metrics and dis_flow ------------------------------------------------------------


def test_video_metrics_source_must_be_a_shapes_video(video):
    with pytest.raises(InputError, match=r"needs a ShapesVideo.*got str 'clip\.mp4'.*load_video\(path\)"):
        S.video_metrics(video.frames, "clip.mp4")
    with pytest.raises(InputError, match="video_caption needs a ShapesVideo"):
        S.video_caption(None)


def test_frames_must_be_uint8_thwc_with_positive_sides(video):
    with pytest.raises(InputError, match=r"uint8 RGB frames \(T, H, W, 3\) with T, H, W >= 1, got uint8 \(3, 0, 0, 3\)"):
        S.video_metrics(np.zeros((3, 0, 0, 3), np.uint8), video)
    with pytest.raises(InputError, match="the edited video has 2 frames, the source 3"):
        S.video_metrics(video.frames[:2], video)
    with pytest.raises(InputError, match=r"dis_flow frames must be uint8 RGB frames.*got float32"):
        S.dis_flow(video.frames.astype(np.float32))
    with pytest.raises(InputError, match=r"dis_flow frames must be uint8.*\(3, 32, 32\)"):
        S.dis_flow(video.frames[..., 0])
    with pytest.raises(InputError, match="too small for DIS"):
        S.dis_flow(np.zeros((2, 8, 8, 3), np.uint8))


@pytest.mark.parametrize("min_visible", [2.0, float("nan"), 0, -0.5, "0.5", True])
def test_min_visible_is_a_fraction(video, min_visible):
    with pytest.raises(InputError, match=r"min_visible .* a number in \(0, 1\]"):
        S.video_metrics(video.frames, video, {0: {"color": "red"}}, min_visible=min_visible)


def test_video_metrics_dis_argument_is_checked(video):
    with pytest.raises(InputError, match=r"dis must be None or the \(flow, valid\) arrays"):
        S.video_metrics(video.frames, video, dis="cached")


def test_video_metrics_valid_call_still_works(video):
    metrics = S.video_metrics(video.frames, video, {0: {"color": "red"}}, min_visible=1)
    assert metrics["frames"] == 3 and metrics["judged_frames"] >= 0


def test_load_quantized_checks_the_device_like_from_pretrained(saved):
    from sanaflow.errors import SanaflowError

    devices = ["meta", "xla"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        with pytest.raises(SanaflowError, match="CUDA is not available|unsupported device"):
            quant.load_quantized(SanaTransformer, saved, device=device)
