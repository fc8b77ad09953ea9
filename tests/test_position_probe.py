"""benchmarks/position_probe.py: the role-swapped caption and a tiny run on the embedded model (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench_scripts import load_bench_script
from sanaflow.shapes.scene import relation_holds


@pytest.fixture(scope="module")
def probe_script():
    return load_bench_script("position_probe")


def test_swapped_scene_asks_for_the_mirrored_layout(probe_script):
    prompts = probe_script.position_prompts(12)
    assert len(prompts) == 12 and all(p.scene.category == "position" for p in prompts)
    for p in prompts:
        s, t = p.scene, probe_script.swapped(p.scene)
        a, b = t.objects
        s0, s1 = s.objects
        # same relation word, the objects named the other way round: the other picture
        assert t.relation == s.relation and t.caption() != s.caption()
        assert (a.shape, a.color, b.shape, b.color) == (s1.shape, s1.color, s0.shape, s0.color)
        # each object takes the other's place, so the swapped statement is true of the swapped scene...
        assert relation_holds((a.x, a.y), (b.x, b.y), t.relation)
        # ... and the original statement is false of it (its first object now sits on the other side)
        assert not relation_holds((b.x, b.y), (a.x, a.y), s.relation)
        assert probe_script.swapped(t) == s


def test_colour_centroids_find_rendered_objects(probe_script):
    from sanaflow.shapes.render import render

    for p in probe_script.position_prompts(6):
        scene = p.scene
        a, b = scene.objects
        if a.color == b.color:
            continue
        img = render(scene, 128)[None].astype(np.float64) / 255.0
        c = probe_script._colour_centroids(img, [a.color, b.color])  # (2, 1, 2)
        assert abs(c[0, 0, 0] - a.x) < 0.06 and abs(c[0, 0, 1] - a.y) < 0.06
        assert abs(c[1, 0, 0] - b.x) < 0.06 and abs(c[1, 0, 1] - b.y) < 0.06


def test_relation_displacement_is_positive_for_true_layouts_and_negative_for_mirrored(probe_script):
    from sanaflow.shapes.render import render

    checked = 0
    for p in probe_script.position_prompts(16):
        scene = p.scene
        if scene.objects[0].color == scene.objects[1].color:
            continue
        true = render(scene, 128)[None].astype(np.float64) / 255.0
        mirrored = render(probe_script.swapped(scene), 128)[None].astype(np.float64) / 255.0
        assert probe_script.relation_displacement(true, scene)[0] > 0.1  # placed >= 0.2 apart along the axis
        # the mirrored picture (objects on each other's place) breaks the original caption's relation
        assert probe_script.relation_displacement(mirrored, scene)[0] < -0.1
        checked += 1
    assert checked >= 8


def test_probe_runs_on_the_embedded_model(probe_script, tmp_path, one_thread):
    out = tmp_path / "probe.json"
    assert probe_script.main(["--n", "2", "--pairs", "1", "--seeds", "1", "--steps", "2", "--layout", "2",
                              "--sensitivity", "2", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    f, o = r["failures"], r["order_sensitivity"]
    assert f["prompts"] == 2 and sum(f.get(k, 0) for k in ("correct", "wrong relation", "object missing")) == 2
    assert o["pairs"] == 1 and o["mean_diff_other"] > 0  # another caption changes the image
    assert o["ratio"] is not None and o["ratio"] >= 0
    fl = r["first_step_layout"]
    assert fl["captions"] == 2 and 0 <= fl["right"] <= 1 and len(fl["rows"]) == 2
    assert all(" " in row["caption"] and abs(row["displacement"]) < 1 for row in fl["rows"])
    bd = r["binding_at_noise"]
    assert bd["captions"] == 2 and bd["sigma"] == 0.9 and 0 <= bd["follows_caption"] <= 1
    assert all(row["twin"] != row["caption"] and abs(row["displacement_twin"]) < 1 for row in bd["rows"])
    cs = r["caption_sensitivity"]
    assert cs["captions"] == 2 and set(cs["by_sigma"]) == {"1.0", "0.93", "0.85", "0.7", "0.5"}
    for row in cs["by_sigma"].values():
        assert row["no_caption"] > 0 and row["mirrored"] >= 0 and row["relation_inverted"] >= 0


def test_probe_refuses_a_binding_sigma_outside_the_open_unit_interval(probe_script, capsys):
    with pytest.raises(SystemExit) as e:
        probe_script.main(["--binding-sigma", "1.0", "--n", "0"])
    assert e.value.code == 2 and "--binding-sigma must be in (0, 1)" in capsys.readouterr().err
