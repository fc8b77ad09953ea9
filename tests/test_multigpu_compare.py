"""1-vs-N-process training: the ranks split the single-process stream; benchmarks/compare_runs.py's verdict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench_scripts import load_bench_script
from sanaflow.errors import InputError
from sanaflow.training import TrainConfig
from sanaflow.training.cache import SamplePool
from sanaflow.training.data import BatchPositionSampler
from sanaflow.training.tasks import _source


@pytest.fixture(scope="module")
def cr():
    return load_bench_script("compare_runs")


# ------------------------------------------------------------------------------ data split across ranks


def _cfg(batch: int, pool: int = 0, reuse: int = 1) -> TrainConfig:
    cfg = TrainConfig()
    cfg.train.batch_size, cfg.data.pool_size, cfg.data.reuse = batch, pool, reuse
    return cfg


def _stream(cfg: TrainConfig, rank: int, world: int):
    """Item numbers of each micro-batch this rank's loader would get (no rendering)."""
    return iter(BatchPositionSampler(_source(cfg, 32), 0, rank, world))


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_the_single_process_batches(world):
    # Global batch 24: one process at batch 24 vs `world` processes at 24 / world each.
    one, many = _stream(_cfg(24), 0, 1), [_stream(_cfg(24 // world), r, world) for r in range(world)]
    for _ in range(5):
        single = next(one)
        union = [i for s in many for i in next(s)]
        assert sorted(union) == single  # the same scenes each step, none twice


def test_pools_per_process_hold_the_single_process_window():
    # 1 process: batch 16, reuse 4 (chunks of 4), pool 32 (8 chunks). 2 processes: batch 8 and pool 16 each.
    def pool(cfg: TrainConfig, rank: int, world: int) -> SamplePool:
        stream = _stream(cfg, rank, world)
        return SamplePool(lambda: {"item": torch.tensor(next(stream))}, cfg.data.pool_size,
                          cfg.train.batch_size // cfg.data.reuse, cfg.train.batch_size)

    single = pool(_cfg(16, pool=32, reuse=4), 0, 1)
    ranks = [pool(_cfg(8, pool=16, reuse=4), r, 2) for r in range(2)]
    for _ in range(12):
        window = sorted(single.store["item"].tolist())
        assert window == sorted(i for p in ranks for i in p.store["item"].tolist())
        assert len(set(window)) == 32
        drawn = [p.next_batch()["item"] for p in ranks]
        assert sum(len(d) for d in drawn) == len(single.next_batch()["item"]) == 16


# ------------------------------------------------------------------------------ the comparison


def _records(loss: np.ndarray, every: int = 10, batch: int = 512, rate: float = 1000.0) -> list[dict]:
    return [{"step": (i + 1) * every, "loss": float(v), "samples": (i + 1) * every * batch, "img_per_s": rate}
            for i, v in enumerate(loss)]


def _curves(seed: int = 0, points: int = 100, sigma: float = 5e-4) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    steps = np.arange(1, points + 1) * 10
    base = 0.04 + 0.01 * np.exp(-steps / 300)
    return tuple(base + sigma * rng.standard_normal(points) for _ in range(3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curves_equal_within_noise_pass(cr, seed):
    a, b, c = _curves(seed)
    out = cr.compare({"a": _records(a), "b": _records(b, rate=1900.0), "c": _records(c)})
    assert out["pass"] and out["same_global_batch"]
    assert 0.6 < out["gap_ratio"] < 1.4
    assert out["gap_a_b"]["points"] == 100
    assert out["scaling"] == pytest.approx(1.9)
    assert abs(out["offset_test"]["b_a"]["t"]) < 3.5  # no systematic offset between same-noise runs


@pytest.mark.parametrize("shift", [1e-3, -1e-3])
def test_shifted_curve_fails(cr, shift):
    a, b, c = _curves(0)
    out = cr.compare({"a": _records(a), "b": _records(b + shift), "c": _records(c)})
    assert not out["pass"]
    assert out["gap_ratio"] > 1.5
    assert np.sign(out["gap_a_b"]["mean_signed"]) == np.sign(shift)
    offset = out["offset_test"]["b_a"]
    assert abs(offset["t"]) > 5 and offset["mean"] == pytest.approx(shift, abs=3e-4)
    assert abs(out["offset_test"]["c_a"]["t"]) < 3.5


def test_other_global_batch_fails(cr):
    a, b, c = _curves(0)
    out = cr.compare({"a": _records(a), "b": _records(b, batch=1024), "c": _records(c)})
    assert out["gap_ratio"] < 1.5 and not out["same_global_batch"] and not out["pass"]


def test_identical_runs_and_alignment(cr):
    a, _, _ = _curves(0, points=20)
    # b logged every 20 steps only, c stopped early: only the common steps count.
    out = cr.compare({"a": _records(a), "b": _records(a[1::2], every=20), "c": _records(a[:10] + 1e-4)})
    assert out["gap_a_b"]["mean_abs"] == 0.0 and out["gap_a_b"]["points"] == 10
    assert out["noise_a_c"]["points"] == 10 and out["noise_a_c"]["last_step"] == 100
    assert out["gap_ratio"] == 0.0 and out["pass"]
    out = cr.compare({"a": _records(a), "b": _records(a + 1e-4), "c": _records(a)})
    assert out["gap_ratio"] == float("inf") and not out["pass"]


def test_smoothing_and_throughput(cr):
    assert cr.smooth(np.array([1.0, 2.0, 3.0, 4.0]), 2).tolist() == [1.5, 2.5, 3.5]
    assert cr.smooth(np.array([1.0, 3.0]), 5).tolist() == [2.0]
    recs = [{"img_per_s": r} for r in (10.0, 50.0, 100.0, 90.0, 110.0)]
    assert cr.throughput(recs, skip_windows=2) == 100.0
    assert cr.throughput(recs[:2], skip_windows=2) == 30.0  # too few windows: all of them
    with pytest.raises(InputError, match="share 1 logged step"):
        cr.curve_gap({10: 1.0}, {10: 1.0, 20: 1.0})


def test_cli_writes_summary(cr, tmp_path, capsys):
    a, b, c = _curves(3)
    for name, curve in zip("abc", (a, b, c)):
        (tmp_path / name).mkdir()
        lines = [json.dumps(r) for r in _records(curve)] + [json.dumps({"step": 1000, "shapes_score": 0.5})]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.json").write_text(json.dumps({"processes": 2, "wall_s": 61.0}))
    out = tmp_path / "res" / "summary.json"
    out.parent.mkdir()
    args = [f"--run={n}={tmp_path / n}" for n in "abc"] + ["--run-info", f"b={tmp_path / 'b.json'}",
                                                            "--meta", "device=H100", "--out", str(out)]
    assert cr.main(args) == 0
    summary = json.loads(out.read_text())
    assert summary["pass"] and summary["meta"] == {"device": "H100"}
    assert summary["runs"]["b"]["processes"] == 2 and len(summary["curves"]["c"]) == 100
    assert "PASS" in capsys.readouterr().out
    assert cr.main([f"--run=a={tmp_path / 'a'}", f"--run=b={tmp_path / 'nowhere'}", f"--run=c={tmp_path / 'c'}",
                    "--out", str(out)]) == 2
    assert "no training log" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the trainer under 2 processes


@pytest.mark.slow
def test_two_processes_agree_on_the_time_limit_at_log_steps(tmp_path):
    """train.max_minutes under DDP: the ranks agree to stop on a log step (no per-step host sync)."""
    from test_training import _torchrun, list_checkpoints, losses, tiny_config, write_yaml

    cfg = write_yaml(tmp_path / "t.yaml", tiny_config(tmp_path / "run", train={
        "max_steps": 8, "log_every": 3, "checkpoint_every": 100, "max_minutes": 0.0}))
    _torchrun(cfg)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000003"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_0000003" / "trainer_state.json").read_text())
    assert state["samples"] == 3 * 2 * 2  # 3 steps x 2 processes x batch 2: the global batch is per process x N
    assert sorted(losses(tmp_path / "run")) == [3]


def test_more_noise_runs_average_the_noise_level(cr):
    a, b, c = _curves(0)
    _, _, c2 = _curves(1)
    one = cr.compare({"a": _records(a), "b": _records(b), "c": _records(c)})
    assert one["noise_level"] == pytest.approx(one["noise_a_c"]["mean_abs"])
    two = cr.compare({"a": _records(a), "b": _records(b), "c": _records(c), "c2": _records(c2 + 2e-3)})
    level = (two["noise_a_c"]["mean_abs"] + two["noise_a_c2"]["mean_abs"]) / 2
    assert two["noise_level"] == pytest.approx(level) and level > one["noise_level"]
    assert two["gap_ratio"] == pytest.approx(two["gap_a_b"]["mean_abs"] / level)
    # a noise run of another global batch breaks the comparison
    bad = cr.compare({"a": _records(a), "b": _records(b), "c": _records(c), "c2": _records(c2, batch=1024)})
    assert not bad["same_global_batch"] and not bad["pass"]
