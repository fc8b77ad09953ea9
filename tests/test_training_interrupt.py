"""Training runs that were interrupted: log windows across a resume, leftovers of killed runs, loader workers, export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from sanaflow.training.export import export_pipeline, export_vae
from test_training import losses, run, tiny_config, write_yaml


def records(out: Path) -> list[dict]:
    """metrics.jsonl without the (timing-dependent) throughput."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]


def test_log_record_after_resume_mid_window_matches_uninterrupted_run(tmp_path):
    # log_every 4: a run stopped at step 1 (train.max_minutes 0) has a partial log window when it
    # checkpoints; the resumed run's record at step 4 must average steps 1-4 as the uninterrupted one
    # does (it used to divide the sum of steps 2-4 by 4).
    train = {"max_steps": 4, "log_every": 4, "checkpoint_every": 100}
    ref = write_yaml(tmp_path / "ref.yaml", tiny_config(tmp_path / "ref", train=train))
    cfg = write_yaml(tmp_path / "run.yaml", tiny_config(tmp_path / "run", train=train))
    run(ref)
    assert run(cfg, "train.max_minutes=0")["step"] == 1
    run(cfg, resume=True)
    assert records(tmp_path / "run") == records(tmp_path / "ref")
    assert sorted(losses(tmp_path / "run")) == [4]


def test_log_record_after_a_logged_stop_averages_only_its_own_steps(tmp_path):
    # A run that ended at step 3 logged steps 1-3; the resumed run's record at step 4 is step 4's loss
    # alone, not a quarter of it.
    train = {"max_steps": 4, "log_every": 4, "checkpoint_every": 100}
    one = write_yaml(tmp_path / "one.yaml", tiny_config(tmp_path / "one", train={**train, "log_every": 1}))
    cfg = write_yaml(tmp_path / "run.yaml", tiny_config(tmp_path / "run", train=train))
    run(one)
    run(cfg, "train.max_steps=3")
    run(cfg, resume=True)
    assert sorted(losses(tmp_path / "run")) == [3, 4]
    assert losses(tmp_path / "run")[4] == losses(tmp_path / "one")[4]


def test_new_run_replaces_the_leftovers_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "run.yaml", tiny_config(out, train={"max_steps": 2}))
    # What a run killed (SIGKILL / SIGTERM) while writing its first checkpoint leaves: its records (the
    # last one torn) and the temporary folder of the save. The new run used to append to the records.
    (out / "checkpoints" / ".step_0000002.k1ll_3d.tmp" / "model").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n{"step": 3, "lo')
    run(cfg)
    assert [r["step"] for r in records(out)] == [1, 2] and 9.0 not in losses(out).values()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]


def test_tensorboard_drops_the_steps_that_a_run_rewrites(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "run.yaml", tiny_config(out, train={"max_steps": 3, "keep_checkpoints": 3}))
    run(cfg)
    shutil.rmtree(out / "checkpoints" / "step_0000003")  # as if killed after step 3's record
    run(cfg, resume=True)  # steps 3 again
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    shutil.rmtree(out / "checkpoints")  # as if killed before the first checkpoint
    run(cfg, "train.max_steps=2")  # a new run in the same folder
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]


def test_resume_ignores_a_torn_metrics_line(tmp_path):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "run.yaml", tiny_config(out, train={"max_steps": 2}))
    run(cfg)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # the run was killed while writing step 3's record
    run(cfg, "train.max_steps=3", resume=True)
    assert [r["step"] for r in records(out)] == [1, 2, 3]


def test_loader_workers_deliver_batches():
    # The DataLoader workers' init set OpenCV's thread count to 1, which deadlocked in the worker
    # (opencv-python 5.x): the first batch never came and `sanaflow train` hung with num_workers > 0.
    code = textwrap.dedent("""
        from sanaflow.training.data import ShapesSource, make_loader
        batch = next(iter(make_loader(ShapesSource(32, batch_size=2), 0, 0, 1, 1)))
        print(tuple(batch["image"].shape))
    """)
    # A session of its own, so that a hung worker is killed with its parent.
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the loader's worker hung") from None
    assert proc.returncode == 0, stderr[-2000:]
    assert stdout.strip() == "(2, 3, 32, 32)"


def test_exported_pipeline_keeps_the_trained_caption_length_and_generates(tmp_path):
    import sanaflow

    dcae = tiny_config(tmp_path / "dcae", train={"max_steps": 1})
    dcae["task"] = "dcae"
    run(write_yaml(tmp_path / "dcae.yaml", dcae))
    factor = export_vae(tmp_path / "dcae" / "checkpoints" / "step_0000001", tmp_path / "vae", resolution=32,
                        device="cpu")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["scaling_factor"] == round(factor, 5)
    t2i = tiny_config(tmp_path / "t2i", train={"max_steps": 1})
    del t2i["model"]["vae"]
    t2i["model"].update(vae_path=str(tmp_path / "vae"), text_max_length=24)
    run(write_yaml(tmp_path / "t2i.yaml", t2i))
    folder = export_pipeline(tmp_path / "t2i" / "checkpoints" / "step_0000001", tmp_path / "vae", tmp_path / "pipe",
                             flow_shift=1.0)
    spec = json.loads((folder / "text_encoder" / "sanaflow_text_encoder.json").read_text())
    assert spec["max_length"] == 24  # was 32 whatever the run was trained with
    pipe = sanaflow.load_pipeline(folder, device="cpu")
    images = np.asarray(pipe(["a red circle"], num_inference_steps=2, seed=0, height=32, width=32,
                             output_type="np").images)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_export_cli_prints_a_user_error_as_one_line(tmp_path, capsys):
    from sanaflow.training.export import main

    assert main(["vae", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "vae")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing is neither a model folder" in err
    assert not (tmp_path / "vae").exists()
