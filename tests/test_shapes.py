"""The shapes world: detector accuracy, scoring, held-out split, determinism, videos with ground truth."""

import json
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sanaflow.errors import SanaflowError
from sanaflow.shapes import (
    CATEGORIES,
    HELD_OUT_PAIRS,
    HELD_OUT_RELATIONS,
    Scene,
    ShapeObject,
    ShapesDataset,
    detect,
    dis_flow,
    eval_prompts,
    exact_match,
    load_video,
    random_video,
    render,
    render_batch,
    render_track,
    sample_scene,
    save_video,
    score,
    video_metrics,
    warp_error,
)
from sanaflow.shapes.scene import PLURALS

N_DETECT = 1000


class _Degrader:
    """JPEG quality 70, Gaussian blur sigma 1, then Gaussian noise sigma 4 (of 255)."""

    def __init__(self, side: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        noise = rng.normal(0.0, 4.0, (side * 2, side * 2, 3))
        # A noise bank cropped at random offsets: fresh noise per image at a fraction of the cost.
        self.pos = np.clip(noise, 0, 255).astype(np.uint8)
        self.neg = np.clip(-noise, 0, 255).astype(np.uint8)
        self.rng = rng

    def __call__(self, img: np.ndarray) -> np.ndarray:
        ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 70])
        assert ok
        img = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
        img = cv2.GaussianBlur(img, (0, 0), 1.0)
        h, w = img.shape[:2]
        y, x = self.rng.integers(0, self.pos.shape[0] - h), self.rng.integers(0, self.pos.shape[1] - w)
        return cv2.subtract(cv2.add(img, self.pos[y : y + h, x : x + w]), self.neg[y : y + h, x : x + w])


def _detector_accuracy(size: int, degrade: bool) -> tuple[float, Counter, list[str]]:
    deg = _Degrader(size) if degrade else None
    errors: Counter = Counter()
    examples = []
    for i in range(N_DETECT):
        # Both splits, so held-out colour-shape pairs are rendered too.
        scene = sample_scene(10_000 + i, "train" if i % 2 else "eval")
        img = render(scene, size)
        if deg is not None:
            img = deg(img)
        dets = detect(img)
        if not exact_match(dets, scene):
            errors[scene.category] += 1
            if len(examples) < 5:
                truth = [(o.color, o.shape, o.size) for o in scene.objects]
                found = [(d.color, d.shape, d.size) for d in dets]
                examples.append(f"seed {10_000 + i}: truth {truth} found {found}")
    return 1 - sum(errors.values()) / N_DETECT, errors, examples


@pytest.mark.parametrize("degrade", [False, True], ids=["clean", "jpeg70-blur1-noise4"])
@pytest.mark.parametrize("size", [256, 512])
def test_detector_exact_match(size, degrade, capsys):
    acc, errors, examples = _detector_accuracy(size, degrade)
    report = (
        f"detector {size}px {'degraded' if degrade else 'clean'}: exact match {acc:.4f} on {N_DETECT}; "
        f"errors by category {dict(errors) or 'none'}" + "".join(f"\n  {e}" for e in examples)
    )
    with capsys.disabled():
        print("\n" + report)
    assert acc >= (0.95 if degrade else 0.99), report


def test_detector_reads_attributes():
    scene = Scene(
        objects=(
            ShapeObject("star", "green", "large", 0.3, 0.3, 10.0),
            ShapeObject("cross", "orange", "small", 0.75, 0.7, 30.0),
        ),
        background="black",
        category="two_object",
    )
    dets = sorted(detect(render(scene, 300)), key=lambda d: d.x)
    assert [(d.shape, d.color, d.size) for d in dets] == [
        ("star", "green", "large"),
        ("cross", "orange", "small"),
    ]
    assert abs(dets[0].x - 0.3) < 0.01 and abs(dets[1].y - 0.7) < 0.01
    # Two different colours touching are still two objects.
    touching = Scene(
        objects=(
            ShapeObject("square", "red", "large", 0.4, 0.5),
            ShapeObject("circle", "blue", "large", 0.62, 0.5),
        ),
        category="two_object",
    )
    got = sorted((d.color, d.shape) for d in detect(render(touching, 256)))
    assert got == [("blue", "circle"), ("red", "square")]
    assert detect(np.full((64, 64, 3), 200, np.uint8)) == []


def test_score_checks_what_the_caption_asks():
    prompts = eval_prompts(120, seed=5)
    assert {p.category for p in prompts} == set(CATEGORIES)
    for p in prompts:
        r = score(render(p.scene, 256), p.scene)
        assert r["correct"], (p.caption, r)

    def first(category, **kw):
        return next(
            p.scene
            for p in prompts
            if p.category == category and all(getattr(p.scene, k) == v for k, v in kw.items())
        )

    def with_obj(scene, i, **changes):
        objs = list(scene.objects)
        objs[i] = ShapeObject(**{**objs[i].__dict__, **changes})
        return Scene(**{**scene.__dict__, "objects": tuple(objs)})

    colors = first("colors")
    other = next(c for c in ("red", "blue") if c != colors.objects[0].color)
    assert not score(render(with_obj(colors, 0, color=other), 256), colors)["correct"]
    # Unnamed attributes are not checked: a single_object prompt passes whatever the colour.
    single = first("single_object")
    assert score(render(with_obj(single, 0, color=other), 256), single)["correct"]
    counting = next(p.scene for p in prompts if p.category == "counting" and len(p.scene.objects) >= 2)
    fewer = Scene(**{**counting.__dict__, "objects": counting.objects[:-1]})
    r = score(render(fewer, 256), counting)
    assert not r["correct"] and "expected" in r["reason"]
    pos = first("position")
    a, b = pos.objects
    swapped = with_obj(with_obj(pos, 0, x=b.x, y=b.y), 1, x=a.x, y=a.y)
    assert not score(render(swapped, 256), pos)["correct"]
    attr = first("color_attr")
    crossed = with_obj(with_obj(attr, 0, color=attr.objects[1].color), 1, color=attr.objects[0].color)
    assert not score(render(crossed, 256), attr)["correct"]


def test_held_out_never_in_training_stream():
    stream = ShapesDataset(seed=0)
    phrases = [f"{c} {s}" for c, s in HELD_OUT_PAIRS] + [f"{c} {PLURALS[s]}" for c, s in HELD_OUT_PAIRS]
    categories = Counter()
    for i in range(100_000):
        scene = stream.scene_at(i)
        categories[scene.category] += 1
        assert not {(o.color, o.shape) for o in scene.objects} & HELD_OUT_PAIRS, scene
        assert scene.stated_relation() not in HELD_OUT_RELATIONS, scene
        caption = scene.caption()
        assert not any(p in caption for p in phrases), caption
    assert set(categories) == set(CATEGORIES) and min(categories.values()) > 15_000
    # ...while the evaluation prompts do test them, in every category that can.
    prompts = eval_prompts(300, seed=1234)
    held = [p for p in prompts if p.held_out]
    assert 0.2 < len(held) / len(prompts) < 0.4
    assert {p.category for p in held} == {"colors", "color_attr", "position"}
    assert any(p.scene.stated_relation() in HELD_OUT_RELATIONS for p in held)
    assert any(p.scene.stated_pairs() & HELD_OUT_PAIRS for p in held)
    assert Counter(p.category for p in prompts) == {c: 50 for c in CATEGORIES}


def test_same_seed_same_scenes_and_pixels():
    assert sample_scene(42) == sample_scene(42)
    assert all(
        Scene.from_dict(json.loads(s.to_json())) == s for s in (sample_scene(i, "eval") for i in range(50))
    )
    assert sample_scene(42) != sample_scene(43)
    assert sample_scene(42, "train") != sample_scene(42, "eval")
    a = render_batch([sample_scene(i) for i in range(8)], 128)
    b = render_batch([sample_scene(i) for i in range(8)], 128)
    assert a.shape == (8, 128, 128, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert np.array_equal(a[3], render(sample_scene(3), 128))
    x1 = list(ShapesDataset(size=64, seed=3, num_samples=6))
    x2 = list(ShapesDataset(size=64, seed=3, num_samples=6))
    assert [c for _, c in x1] == [c for _, c in x2]
    assert all(torch.equal(i1, i2) for (i1, _), (i2, _) in zip(x1, x2))
    img = x1[0][0]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and -1 <= img.min() < img.max() <= 1
    x3 = list(ShapesDataset(size=64, seed=4, num_samples=6))
    assert [c for _, c in x1] != [c for _, c in x3]
    assert eval_prompts(10, 7) == eval_prompts(10, 7)


def test_workers_and_ranks_disjoint_and_resumable():
    ds = ShapesDataset(size=32, seed=0, batch_size=4, num_samples=64)
    per_worker = [list(ds.local_indices(w, 3)) for w in range(3)]
    flat = sorted(i for idx in per_worker for i in idx)
    assert flat == list(range(64))  # every sample once, no worker repeats another's
    ranks = [ShapesDataset(seed=0, rank=r, world_size=2) for r in range(2)]
    g = [{d.global_index(i) for i in range(100)} for d in ranks]
    assert not g[0] & g[1] and g[0] | g[1] == set(range(200))
    assert ranks[0].scene_at(5) != ranks[1].scene_at(5)

    def batches(workers, start=0, n=24):
        d = ShapesDataset(size=32, seed=1, batch_size=4, start_index=start, num_samples=n)
        return [c for _, caps in DataLoader(d, batch_size=4, num_workers=workers) for c in caps]

    serial = batches(0)
    assert batches(2) == serial  # the same order whatever the number of workers
    resumed = ShapesDataset(size=32, seed=1, batch_size=4)
    resumed.load_state_dict(ShapesDataset(size=32, seed=1, batch_size=4).state_dict(consumed=8))
    assert resumed.start_index == 8 and batches(2, start=8, n=16) == serial[8:]
    with pytest.raises(SanaflowError):
        resumed.load_state_dict({**resumed.state_dict(), "seed": 99})


def test_video_ground_truth_flow_and_flicker_ranking():
    video = random_video(3, frames=12, size=128, pan=True)
    assert video.frames.shape == (12, 128, 128, 3) and video.flow.shape == (11, 128, 128, 2)
    assert video.valid.mean() > 0.8
    assert (video.visibility < 0.9).any(), "objects should occlude each other somewhere"
    assert warp_error(video.frames, video.flow, video.valid) < 1e-4
    # A wrong flow (zero) is far worse than the true one: the objects and the background move.
    assert (
        warp_error(video.frames, np.zeros_like(video.flow), video.valid)
        > 20 * warp_error(video.frames, video.flow, video.valid) + 1e-4
    )
    dis, dis_valid = dis_flow(video.frames)
    rng = np.random.default_rng(0)
    signs = rng.choice([-1.0, 1.0], size=(12, 1, 1, 3))
    gt_err, dis_err = [], []
    for amp in (0, 3, 6, 12, 24):
        flicker = np.clip(video.frames + amp * signs, 0, 255).astype(np.uint8)
        gt_err.append(warp_error(flicker, video.flow, video.valid))
        dis_err.append(warp_error(flicker, dis, dis_valid))
    assert gt_err[0] < 1e-4
    assert all(a < b for a, b in zip(gt_err, gt_err[1:])), gt_err
    assert all(a < b for a, b in zip(dis_err, dis_err[1:])), dis_err
    assert np.argsort(gt_err).tolist() == np.argsort(dis_err).tolist()


def test_video_save_load_and_edit_metrics(tmp_path):
    video = random_video(5, frames=8, size=96)
    path = save_video(video, tmp_path / "clip.mp4")
    assert (tmp_path / "clip.json").is_file()
    loaded = load_video(path)
    assert loaded.track == video.track and np.array_equal(loaded.labels, video.labels)
    assert np.abs(loaded.frames.astype(int) - video.frames).mean() < 3  # H.264, nearly lossless
    # A perfect colour edit: the same track with object 0 recoloured.
    new_color = next(
        c for c in ("green", "pink", "cyan") if c not in {o["color"] for o in video.track["objects"]}
    )
    track = {
        **video.track,
        "objects": [dict(video.track["objects"][0], color=new_color), *video.track["objects"][1:]],
    }
    edited = render_track(track).frames
    good = video_metrics(edited, loaded, {0: {"color": new_color}})
    assert good["edit_accuracy"] >= 0.9 and good["structure_iou"] > 0.85
    assert good["warp_error_gt"] < 1e-3
    unchanged = video_metrics(loaded.frames, loaded, {0: {"color": new_color}})
    assert unchanged["edit_accuracy"] <= 0.1
    with pytest.raises(SanaflowError):
        video_metrics(edited[:4], loaded)
    with pytest.raises(SanaflowError):
        video_metrics(edited, loaded, {0: {"color": "grene"}})


def test_ground_truth_flow_follows_the_rendered_geometry():
    """Flow checked against the renderer's own outlines: star points inside the star land where they are drawn next."""
    from sanaflow.shapes.motion import random_track
    from sanaflow.shapes.render import outline

    track = random_track(0, frames=5, size=160, num_objects=1, pan=True)
    frames = 5
    track["objects"] = [
        {
            "shape": "star",
            "color": "red",
            "size": "large",
            "x": [0.40 + 0.03 * t for t in range(frames)],
            "y": [0.50 - 0.02 * t for t in range(frames)],
            "rotation": [10.0 + 7.0 * t for t in range(frames)],
            "scale": [1.0 + 0.05 * t for t in range(frames)],
        }
    ]
    video = render_track(track)
    o = track["objects"][0]
    for t in range(frames - 1):
        polys = [
            outline(
                ShapeObject("star", "red", "large", o["x"][i], o["y"][i], o["rotation"][i]),
                160,
                160,
                o["scale"][i],
            )
            for i in (t, t + 1)
        ]
        centres = [p.mean(0) for p in polys]
        for v0, v1 in zip(polys[0], polys[1]):
            p0 = centres[0] + 0.6 * (v0 - centres[0])  # well inside the star
            p1 = centres[1] + 0.6 * (v1 - centres[1])
            ix, iy = int(round(p0[0])), int(round(p0[1]))
            assert video.labels[t, iy, ix] == 1
            moved = np.array([ix, iy]) + video.flow[t, iy, ix]
            # The flow at the rounded pixel moves it to within (scale change + rotation) x 0.7 px of p1.
            assert np.abs(moved - (p1 + (np.array([ix, iy]) - p0))).max() < 0.35, (t, moved, p1)
    # The background moves with the pan offset; DIS on the texture agrees with it.
    dis, _ = dis_flow(video.frames)
    bg = (video.labels[:-1] == 0) & video.valid
    pan = np.diff(np.array(track["pan"]), axis=0)  # (T - 1, 2)
    assert np.allclose(video.flow[0][bg[0]], pan[0], atol=1e-5)
    assert np.median(np.linalg.norm(dis[bg] - video.flow[bg], axis=-1)) < 0.5


def test_metrics_of_a_resize_cropped_edit_judge_it_against_the_same_crop():
    """`edit` centre-crops to the model's multiple: such frames are scored against the source cropped alike."""
    from sanaflow.shapes.motion import crop_video
    from sanaflow.video import crop_plan, resize_crop

    video = random_video(4, frames=6, size=(100, 140))  # neither side a multiple of 32
    itself = video_metrics(video.frames, video)
    cropped = resize_crop(video.frames, 32)  # (6, 96, 128, 3), as a SANA edit's frames
    got = video_metrics(cropped, video)
    # Stretching the crop back to 100x140 (what the metrics did before) moved every outline.
    assert got["structure_iou"] == pytest.approx(itself["structure_iou"], abs=0.02)
    assert got["warp_error_gt"] <= 2 * itself["warp_error_gt"] + 1e-5
    assert got["source_warp_error_gt"] < 1e-4 and got["frames"] == 6
    # A colour edit of the cropped frames is found where the cropped track puts the object.
    new_color = next(c for c in ("green", "pink", "cyan") if c not in {o["color"] for o in video.track["objects"]})
    objects = video.track["objects"]
    track = {**video.track, "objects": [dict(objects[0], color=new_color), *objects[1:]]}
    edit = {0: {"color": new_color}}
    assert video_metrics(resize_crop(render_track(track).frames, 32), video, edit)["edit_accuracy"] >= 0.9
    # Resize-then-crop (an int size) keeps labels, flow and valid mask on the frames' grid.
    plan = crop_plan(100, 140, 32, 128)
    small = crop_video(video, plan)
    assert small.frames.shape == (6, 64, 128, 3) and small.labels.shape == (6, 64, 128)
    assert small.flow.shape == (5, 64, 128, 2) and small.valid.shape == (5, 64, 128)
    assert warp_error(small.frames, small.flow, small.valid) < 1e-3
    assert video_metrics(resize_crop(video.frames, 32, 128), video)["warp_error_gt"] < 1e-3
