"""Checks of `sanaflow train` that run before any model is built: config ranges, output_dir, --resume files.

None of these tests trains a step: bad values are refused by `validate` (or by the CLI before the
models load), and a refused run leaves nothing behind.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sanaflow.cli import main
from sanaflow.config import from_dict, load_config, load_yaml_tree
from sanaflow.errors import CheckpointError, ConfigError, InputError
from sanaflow.training import TrainConfig, validate
from sanaflow.training.config import EVAL_SAMPLERS
from sanaflow.training.trainer import _load_resume_files, _rng_state, check_output_dir
from test_training import tiny_config, write_yaml


def _validated(tmp_path: Path, *overrides: str) -> TrainConfig:
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny_config(tmp_path / "run"))
    return validate(load_config(cfg, TrainConfig, list(overrides)))


BAD = [
    # optimizer (torch's AdamW used to raise a raw ValueError after the models loaded)
    ("optim.lr=-1", r"optim\.lr must be a finite number > 0, got -1"),
    ("optim.lr=0", r"optim\.lr must be a finite number > 0"),
    ("optim.lr=.nan", r"optim\.lr must be a finite number > 0, got nan"),
    ("optim.lr=.inf", r"optim\.lr must be a finite number > 0, got inf"),
    ("optim.betas=[0.9,2.0]", r"optim\.betas\[1\] must be a number in \[0, 1\), got 2\.0"),
    ("optim.betas=[-0.1,0.9]", r"optim\.betas\[0\] must be a number in \[0, 1\)"),
    ("optim.betas=[0.9,1.0]", r"optim\.betas\[1\] must be a number in \[0, 1\)"),
    ("optim.betas=[0.9,.nan]", r"optim\.betas\[1\]"),
    ("optim.betas=[0.9]", r"optim\.betas needs two numbers"),
    ("optim.eps=0", r"optim\.eps must be a finite number > 0"),
    ("optim.weight_decay=-0.1", r"optim\.weight_decay must be a finite number >= 0"),
    ("optim.warmup_steps=-5", r"optim\.warmup_steps must be an integer >= 0 \(0 = no warmup\), got -5"),
    ("optim.min_lr_ratio=1.5", r"optim\.min_lr_ratio must be a number in \[0, 1\]"),
    ("optim.grad_clip=.nan", r"optim\.grad_clip must be a finite number >= 0 \(0 = no gradient clipping\)"),
    ("optim.grad_clip=-1", r"optim\.grad_clip must be a finite number >= 0"),
    # data
    ("data.num_workers=-1", r"data\.num_workers must be an integer >= 0"),
    ("data.resolution=0", r"data\.resolution must be an integer >= 32"),
    ("data.resolution=48", r"data\.resolution must be a multiple of 32"),
    ("data.caption_ext=txt", r"data\.caption_ext must be a file suffix such as '\.txt'"),
    ("data.pool_size=-8", r"data\.pool_size must be an integer >= 0"),
    ("data.seed=18446744073709551616", r"data\.seed must be an integer in \[-2\*\*63, 2\*\*63\)"),
    # loop (log_every / checkpoint_every 0 used to divide by zero after training steps)
    ("train.log_every=0", r"train\.log_every must be an integer >= 1"),
    ("train.checkpoint_every=0", r"train\.checkpoint_every must be an integer >= 1"),
    ("train.checkpoint_every=-3", r"train\.checkpoint_every must be an integer >= 1"),
    ("train.keep_checkpoints=-1", r"train\.keep_checkpoints must be an integer >= 1"),
    ("train.keep_checkpoints=0", r"train\.keep_checkpoints must be an integer >= 1"),
    ("train.max_minutes=-1", r"train\.max_minutes must be a finite number >= 0 \(or null for no time limit\)"),
    ("train.max_minutes=.nan", r"train\.max_minutes must be a finite number >= 0"),
    ("train.max_minutes=.inf", r"train\.max_minutes must be a finite number >= 0"),
    ("train.batch_size=0", r"train\.batch_size must be an integer >= 1"),
    ("train.grad_accum=0", r"train\.grad_accum must be an integer >= 1"),
    ("train.max_steps=0", r"train\.max_steps must be an integer >= 1"),
    ("train.ema_decay=1.0", r"train\.ema_decay must be a number in \[0, 1\)"),
    ("train.ema_decay=.nan", r"train\.ema_decay must be a number in \[0, 1\)"),
    # flow-matching loss
    ("flow.shift=0", r"flow\.shift must be a finite number > 0"),
    ("flow.shift=-2", r"flow\.shift must be a finite number > 0"),
    ("flow.logit_std=-1", r"flow\.logit_std must be a finite number > 0"),
    ("flow.logit_std=0", r"flow\.logit_std must be a finite number > 0"),
    ("flow.logit_mean=.nan", r"flow\.logit_mean must be a finite number"),
    ("flow.caption_dropout=.nan", r"flow\.caption_dropout must be a number in \[0, 1\)"),
    ("flow.coarse=.nan", r"flow\.coarse must be >= 0"),
    ("flow.coarse=.inf", r"flow\.coarse must be >= 0"),
    # DC-AE loss
    ("dcae.l1=-1", r"dcae\.l1 must be a finite number >= 0"),
    ("dcae.latent_noise=.nan", r"dcae\.latent_noise must be a finite number >= 0"),
    ("dcae.adv_start=-1", r"dcae\.adv_start must be an integer >= 0"),
    # evaluation (every -1 used to evaluate every step, since step % -1 == 0)
    ("eval.every=-1", r"eval\.every must be an integer >= 0 .*0 = none during training"),
    ("eval.num_prompts=0", r"eval\.num_prompts must be an integer >= 1"),
    ("eval.steps=0", r"eval\.steps must be an integer >= 1"),
    ("eval.guidance_scale=-1", r"eval\.guidance_scale must be a finite number >= 0"),
    ("eval.flow_shift=0", r"eval\.flow_shift must be a finite number > 0"),
    ("eval.flow_shift=1e8", r"eval\.flow_shift must be a number in \[0.01, 100\]"),  # sigmas would round to 1
    ("flow.shift=1e8", r"flow\.shift must be a number in \[0.01, 100\]"),
    ("eval.num_images=0", r"eval\.num_images must be an integer >= 1"),
    ("eval.sampler=dpm", r"unknown eval\.sampler 'dpm'.*choose from: dpm\+\+2m, euler, scm"),
    # top level and model
    ("seed=-9223372036854775809", r"seed must be an integer in \[-2\*\*63, 2\*\*63\)"),
    ("output_dir=''", r"output_dir must be a folder path"),
    ("model.text_max_length=0", r"model\.text_max_length must be an integer >= 1"),
    ("model.text_cache=-1", r"model\.text_cache must be an integer >= 0"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[o for o, _ in BAD])
def test_bad_values_are_refused_by_validate(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _validated(tmp_path, override)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides", [
    ["optim.grad_clip=0", "optim.warmup_steps=0", "optim.weight_decay=0", "optim.min_lr_ratio=1"],
    ["optim.betas=[0, 0.999]", "optim.lr=1e-6", "optim.name=came", "optim.schedule=cosine"],
    ["eval.every=0", "eval.guidance_scale=0", "train.max_minutes=null", "train.ema_decay=0"],
    ["train.max_minutes=0", "train.keep_checkpoints=1", "train.log_every=1", "train.checkpoint_every=1"],
    ["flow.shift=3", "flow.logit_std=0.5", "flow.logit_mean=-1", "flow.caption_dropout=0"],
    ["seed=-1", "data.seed=9223372036854775807", "eval.seed=0", "data.num_workers=0", "model.text_cache=0"],
    ["data.caption_ext=.caption.txt", "data.resolution=32"],
])
def test_boundary_values_are_accepted(tmp_path, overrides):
    _validated(tmp_path, *overrides)


def test_shipped_training_configs_pass_validation():
    from sanaflow.config import CONFIG_DIR

    files = sorted((CONFIG_DIR / "train").glob("[!_]*.yaml"))
    assert files
    for path in files:
        validate(from_dict(TrainConfig, load_yaml_tree(path), source=str(path)))


def test_eval_samplers_are_the_registered_ones():
    from sanaflow.sampling.solvers import SAMPLERS

    assert sorted(EVAL_SAMPLERS) == sorted(SAMPLERS)


@pytest.mark.parametrize("override", ["optim.lr=.nan", "train.log_every=0", "train.checkpoint_every=0",
                                      "data.num_workers=-1", "eval.every=-1"])
def test_cli_refuses_bad_values_in_one_line_before_any_model(tmp_path, capsys, no_models, override):
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny_config(tmp_path / "run"))
    assert main(["train", "--config", str(cfg), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sanaflow: error:") and "\n" not in err and override.split("=")[0] in err
    assert not (tmp_path / "run").exists()  # no config.yaml, tensorboard/ or metrics.jsonl left behind


@pytest.fixture
def no_networks(monkeypatch):
    """Make constructing the transformer or the DC-AE fail loudly (the first expensive step of a task)."""
    from sanaflow.models import DCAE, SanaTransformer

    def refuse(*args, **kwargs):
        raise AssertionError("a network was built before the checks")

    for cls, name in ((SanaTransformer, "from_config"), (DCAE, "from_config"), (DCAE, "from_pretrained")):
        monkeypatch.setattr(cls, name, refuse)


@pytest.mark.parametrize("task", ["t2i", "dcae"])
def test_folder_data_is_checked_before_any_network(tmp_path, capsys, no_networks, task):
    from sanaflow.training import build_task

    empty = tmp_path / "empty"
    empty.mkdir()
    for path, message in ((tmp_path / "nowhere", "does not exist"), (empty, "no images")):
        data = tiny_config(tmp_path / "run", data={"source": "folder", "path": str(path)})
        data["task"] = task
        cfg = write_yaml(tmp_path / "cfg.yaml", data)
        with pytest.raises(InputError, match=message):
            build_task(load_config(cfg, TrainConfig))
        assert main(["train", "--config", str(cfg)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ config files


def test_config_file_that_is_not_utf8_or_is_a_folder(tmp_path, capsys):
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(ConfigError, match=r"junk\.yaml is not a UTF-8 YAML file"):
        load_config(junk, TrainConfig)
    folder = tmp_path / "configs"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"configs is a folder, not a YAML file"):
        load_config(folder, TrainConfig)
    for ref, message in ((junk, "not a UTF-8 YAML file"), (folder, "is a folder, not a YAML file")):
        assert main(["train", "--config", str(ref)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err


# ------------------------------------------------------------------------------ output_dir and --resume


def _fake_checkpoint(out: Path, step: int = 2, optim: str = "adamw") -> Path:
    """A checkpoint folder with every part a resumed run reads (weights folders left empty)."""
    path = out / "checkpoints" / f"step_{step:07d}"
    (path / "model").mkdir(parents=True)
    (path / "ema").mkdir()
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "scheduler": {}}, path / "optimizer.pt")
    torch.save([_rng_state()], path / "rng.pt")
    state = {"step": step, "micro_step": step, "samples": 2 * step, "world_size": 1, "fingerprint": {},
             "config": {"optim": {"name": optim}}}
    (path / "trainer_state.json").write_text(json.dumps(state))
    return path


def _cfg(out: Path, **optim) -> TrainConfig:
    return validate(from_dict(TrainConfig, tiny_config(out, optim=optim)))


def test_output_dir_checks(tmp_path):
    out = tmp_path / "run"
    assert check_output_dir(_cfg(out), resume=False) is None  # a new run
    with pytest.raises(CheckpointError, match=r"--resume: no checkpoint in .*leave out --resume"):
        check_output_dir(_cfg(out), resume=True)
    ckpt = _fake_checkpoint(out)
    with pytest.raises(ConfigError, match="already holds checkpoints .*pass --resume"):
        check_output_dir(_cfg(out), resume=False)
    assert check_output_dir(_cfg(out), resume=True) == ckpt
    with pytest.raises(CheckpointError, match=r"trained with optim.name 'adamw', this config has 'came'.*"
                                              r"--set optim.name=adamw"):
        check_output_dir(_cfg(out, name="came"), resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output_dir(_cfg(tmp_path / "file"), resume=False)


def _junk(path: Path) -> None:
    path.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(3000)))


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "rng.pt").unlink(), r"rng\.pt \(the RNG states\) is missing"),
    (lambda p: (p / "optimizer.pt").unlink(), r"optimizer\.pt \(the optimizer and LR schedule\) is missing"),
    (lambda p: (p / "ema").rmdir(), r"ema \(the EMA weights\) is missing"),
    (lambda p: _junk(p / "optimizer.pt"), r"optimizer\.pt .*is not a readable torch file"),
    (lambda p: _junk(p / "rng.pt"), r"rng\.pt .*is not a readable torch file"),
    (lambda p: torch.save({"a": 1}, p / "optimizer.pt"), r"optimizer\.pt is not a sanaflow optimizer state"),
    (lambda p: torch.save([], p / "rng.pt"), r"rng\.pt does not hold the RNG states of 1 process"),
    (lambda p: torch.save([{"python": [1]}], p / "rng.pt"), r"rng\.pt holds a damaged RNG state"),
    (lambda p: (p / "trainer_state.json").write_text('{"step": 2}'), r"trainer_state\.json lacks valid"),
])
def test_damaged_checkpoint_is_refused_with_what_to_do(tmp_path, damage, message):
    out = tmp_path / "run"
    damage(_fake_checkpoint(out))
    with pytest.raises(CheckpointError, match=message + r".*cannot be resumed: delete that folder"):
        check_output_dir(_cfg(out), resume=True)


def test_cli_resume_checks_come_before_any_model(tmp_path, capsys, no_models):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny_config(out))
    assert main(["train", "--config", str(cfg), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not out.exists()
    ckpt = _fake_checkpoint(out)
    assert main(["train", "--config", str(cfg)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    _junk(ckpt / "optimizer.pt")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["train", "--config", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "optimizer.pt" in err and "not a readable torch file" in err and "\n" not in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_checking_the_rng_file_leaves_the_rng_states_alone(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "run")
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    expected = random.random(), np.random.standard_normal(), torch.rand(3)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    np.random.standard_normal()
    _load_resume_files(ckpt, 1)
    assert (random.random(), np.random.standard_normal()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_scm_eval_sampler_is_refused_for_flow_matching_before_any_model(tmp_path, capsys, no_models):
    # It used to pass validation and fail at the first evaluation, after the training steps.
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny_config(tmp_path / "run"))
    assert main(["train", "--config", str(cfg), "--set", "eval.sampler=scm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "eval.sampler 'scm'" in err and "euler or dpm++2m" in err
    assert not (tmp_path / "run").exists()
