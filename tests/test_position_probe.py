"""benchmarks/position_probe.py: the role-swapped caption and a tiny run on the embedded model (CPU)."""

from __future__ import annotations

import json

import pytest

from bench_scripts import load_bench_script
from sanaflow.shapes.scene import relation_holds


@pytest.fixture(scope="module")
def probe_script():
    return load_bench_script("position_probe")


def test_swapped_scene_names_the_objects_the_other_way_and_stays_true(probe_script):
    prompts = probe_script.position_prompts(12)
    assert len(prompts) == 12 and all(p.scene.category == "position" for p in prompts)
    for p in prompts:
        s, t = p.scene, probe_script.swapped(p.scene)
        a, b = t.objects
        assert (a, b) == (s.objects[1], s.objects[0])
        # the same picture: the swapped statement is true of the same object positions
        assert relation_holds((a.x, a.y), (b.x, b.y), t.relation)
        assert relation_holds((s.objects[0].x, s.objects[0].y), (s.objects[1].x, s.objects[1].y), s.relation)
        assert t.caption() != s.caption()
        assert probe_script.swapped(t) == s


def test_probe_runs_on_the_embedded_model(probe_script, tmp_path, one_thread):
    out = tmp_path / "probe.json"
    assert probe_script.main(["--n", "2", "--pairs", "1", "--seeds", "1", "--steps", "2", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    f, o = r["failures"], r["order_sensitivity"]
    assert f["prompts"] == 2 and sum(f.get(k, 0) for k in ("correct", "wrong relation", "object missing")) == 2
    assert o["pairs"] == 1 and o["mean_diff_other"] > 0  # another caption changes the image
    assert o["ratio"] is not None and o["ratio"] >= 0
