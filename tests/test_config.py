"""YAML configs: inheritance, overrides, validation messages, shipped model specs."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from sanaflow.config import (
    CONFIG_DIR,
    GenerateConfig,
    ModelSpec,
    SamplingConfig,
    config_names,
    dump_config,
    from_dict,
    load_config,
    load_yaml_tree,
    model_spec,
    model_specs,
)
from sanaflow.errors import ConfigError, SanaflowError
from sanaflow.models.dc_ae import DCAE

EXPECTED_SPECS = {
    "sana-600m-512", "sana-600m-1024", "sana-1600m-512", "sana-1600m-1024", "sana-1600m-2k", "sana-1600m-4k",
    "sana-sprint-1600m-1024", "shapes-tiny",
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- inheritance, overrides


def test_three_level_inheritance_with_relative_paths(tmp_path):
    write(tmp_path / "root" / "base.yaml", "model: base-model\noutput_dir: out\nsampling: {steps: 10, guidance_scale: 2.0}\n")
    write(tmp_path / "family" / "fam.yaml", "base: ../root/base.yaml\nsampling: {steps: 15, sampler: euler}\n")
    leaf = write(tmp_path / "leaf.yaml", "base: family/fam.yaml\nmodel: leaf-model\nsampling: {seed: 3}\n")
    cfg = load_config(leaf, GenerateConfig)
    assert cfg.model == "leaf-model"  # leaf wins
    assert cfg.output_dir == "out"  # from the root, two levels up
    assert cfg.sampling == SamplingConfig(steps=15, guidance_scale=2.0, sampler="euler", seed=3)  # deep-merged


def test_shipped_specs_use_three_levels():
    tree = load_yaml_tree(config_names("models")["sana-600m-1024"])
    assert "base" not in tree
    spec = model_spec("sana-600m-1024")
    assert spec.transformer["caption_channels"] == 2304  # _base.yaml
    assert spec.transformer["num_layers"] == 28  # _sana-600m.yaml
    assert spec.transformer["sample_size"] == 32  # the leaf
    assert spec.vae["scaling_factor"] == pytest.approx(0.41407)


def test_overrides_are_yaml_parsed(tmp_path):
    path = write(tmp_path / "g.yaml", "prompts: [a cat]\n")
    cfg = load_config(
        path, GenerateConfig,
        ["sampling.steps=30", "sampling.guidance_scale=1e-6", "sampling.seed=7", "prompts=[a, b]",
         "dtype=bfloat16", "sampling.flow_shift=null", "width=512"],
    )
    assert cfg.sampling.steps == 30 and cfg.sampling.seed == 7
    assert cfg.sampling.guidance_scale == 1e-6  # YAML 1.1 reads 1e-6 as text; overrides treat it as a number
    assert cfg.prompts == ["a", "b"] and cfg.dtype == "bfloat16" and cfg.width == 512
    spec = model_spec("sana-600m-512", ["transformer.num_layers=2", "sampling.sampler=euler"])
    assert spec.transformer["num_layers"] == 2 and spec.transformer["num_attention_heads"] == 36
    assert spec.sampling.sampler == "euler"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, GenerateConfig, ["sampling.steps"])
    with pytest.raises(ConfigError, match="prompts is a list, not a section"):
        load_config(path, GenerateConfig, ["prompts.x=1"])
    with pytest.raises(ConfigError, match=r"output_dir: expected str, got dict"):
        load_config(path, GenerateConfig, ["output_dir.x=1"])


# ---------------------------------------------------------------- validation messages


def test_misspelt_key_is_named_with_suggestion_and_choices(tmp_path):
    path = write(tmp_path / "g.yaml", "sampling:\n  stpes: 30\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, GenerateConfig)
    msg = str(err.value)
    assert "'sampling.stpes'" in msg and "did you mean 'steps'" in msg
    assert "guidance_scale" in msg and "sampler" in msg  # lists the valid keys
    assert str(path) in msg
    with pytest.raises(ConfigError, match="did you mean 'output_dir'"):
        load_config(write(tmp_path / "h.yaml", "{}"), GenerateConfig, ["outptu_dir=x"])


def test_type_errors_are_clear(tmp_path):
    path = write(tmp_path / "g.yaml", "sampling:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"sampling\.steps: expected int, got str 'many'"):
        load_config(path, GenerateConfig)
    with pytest.raises(ConfigError, match=r"use_resolution_binning: expected bool"):
        from_dict(GenerateConfig, {"use_resolution_binning": "yes please"})
    with pytest.raises(ConfigError, match=r"sampling\.steps: expected int, got bool"):
        from_dict(GenerateConfig, {"sampling": {"steps": True}})
    with pytest.raises(ConfigError, match=r"prompts\[1\]: expected str"):
        from_dict(GenerateConfig, {"prompts": ["ok", 3]})
    with pytest.raises(ConfigError, match=r"width: expected int or null"):
        from_dict(GenerateConfig, {"width": 1.5})
    # Literal: unknown value, with a suggestion and the choices
    with pytest.raises(ConfigError, match=r"sampling\.sampler: unknown value 'dpm\+\+2' .*dpm\+\+2m.*euler"):
        from_dict(GenerateConfig, {"sampling": {"sampler": "dpm++2"}})
    # value checks in __post_init__ keep the location
    with pytest.raises(ConfigError, match=r"sampling: steps must be >= 1"):
        from_dict(GenerateConfig, {"sampling": {"steps": 0}})
    with pytest.raises(ConfigError, match="missing required key.*name"):
        from_dict(ModelSpec, {"resolution": 512})
    # an int where a float is expected is accepted and converted, as is YAML 1.1's textual "1e-6"
    assert from_dict(SamplingConfig, {"guidance_scale": 5}).guidance_scale == 5.0
    assert load_config(write(tmp_path / "e.yaml", "sampling: {guidance_scale: 1e-6}\n"), GenerateConfig).sampling.guidance_scale == 1e-6
    with pytest.raises(ConfigError, match="negative_prompt: expected str, got float"):
        from_dict(GenerateConfig, {"negative_prompt": 1.5})


def test_inheritance_cycle_and_missing_base(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\nmodel: a\n")
    write(tmp_path / "b.yaml", "base: c.yaml\n")
    write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: a\.yaml -> b\.yaml -> c\.yaml -> a\.yaml"):
        load_config(tmp_path / "a.yaml", GenerateConfig)
    write(tmp_path / "d.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="base 'nowhere.yaml' not found"):
        load_config(tmp_path / "d.yaml", GenerateConfig)
    write(tmp_path / "bad.yaml", "sampling: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "bad.yaml", GenerateConfig)
    write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(tmp_path / "list.yaml", GenerateConfig)


def test_user_config_can_inherit_a_shipped_config_by_name(tmp_path):
    path = write(tmp_path / "mine.yaml", "base: generate-sprint\nsampling: {steps: 4}\n")
    cfg = load_config(path, GenerateConfig)
    assert cfg.sampling.sampler == "scm" and cfg.sampling.steps == 4


def test_unknown_names_list_choices():
    with pytest.raises(SanaflowError) as err:
        model_spec("sana-600m-1042")
    msg = str(err.value)
    assert "did you mean 'sana-600m-1024'" in msg and all(name in msg for name in EXPECTED_SPECS)
    with pytest.raises(SanaflowError, match="generate"):
        load_config("generat", GenerateConfig)
    with pytest.raises(SanaflowError, match="not found"):
        load_config("/nonexistent/file.yaml", GenerateConfig)


# ---------------------------------------------------------------- generic machinery, dump


@dataclass
class _Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class _TrainConfig:
    """A schema defined elsewhere (as the training code will), reusing the same loader."""

    run: str
    optim: _Optim = field(default_factory=_Optim)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    milestones: list[int] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)
    mode: typing.Literal["full", "lora"] = "full"
    resume: str | None = None


def test_generic_nested_schema_and_dump_round_trip(tmp_path):
    path = write(
        tmp_path / "t.yaml",
        "run: r1\noptim: {lr: 0.001, betas: [0.8, 0.9]}\nmilestones: [10, 20]\nextra: {ema: 0.99}\nmode: lora\n",
    )
    cfg = load_config(path, _TrainConfig, ["sampling.steps=4"])
    assert cfg.optim == _Optim(lr=0.001, betas=(0.8, 0.9)) and cfg.mode == "lora" and cfg.sampling.steps == 4
    with pytest.raises(ConfigError, match=r"optim\.betas: expected a list of 2 items, got 3"):
        load_config(path, _TrainConfig, ["optim.betas=[1, 2, 3]"])
    with pytest.raises(ConfigError, match=r"extra\.ema: expected float"):
        load_config(path, _TrainConfig, ["extra.ema=high"])

    out = tmp_path / "run" / "config.yaml"
    dump_config(cfg, out)
    assert load_config(out, _TrainConfig) == cfg
    assert yaml.safe_load(out.read_text())["optim"]["betas"] == [0.8, 0.9]
    assert sorted(p.name for p in out.parent.iterdir()) == ["config.yaml"]  # atomic: no temp file left

    gen = load_config("generate", GenerateConfig, ["prompts=[a red circle]", "sampling.seed=1"])
    dump_config(gen, tmp_path / "gen.yaml")
    assert load_config(tmp_path / "gen.yaml", GenerateConfig) == gen


# ---------------------------------------------------------------- shipped configs


def _schemas() -> dict[str, type]:
    """Schema of each configs/ sub-folder (training configs are defined by sanaflow.training)."""
    schemas: dict[str, type] = {"models": ModelSpec, "generate": GenerateConfig}
    try:
        from sanaflow.training.config import TrainConfig
    except ImportError:
        pass
    else:
        schemas["train"] = TrainConfig
    return schemas


def test_every_shipped_yaml_loads_and_validates():
    files = sorted(CONFIG_DIR.rglob("*.yaml"))
    assert len(files) >= 12
    schemas = _schemas()
    for path in files:
        tree = load_yaml_tree(path)
        schema = schemas.get(path.relative_to(CONFIG_DIR).parts[0])
        if schema is None:
            continue  # a folder whose schema lives elsewhere: it must at least parse and resolve its bases
        # base files (leading underscore) are checked key by key; named configs must be complete
        result = from_dict(schema, tree, source=str(path), partial=path.name.startswith("_"))
        if not path.name.startswith("_"):
            assert dataclasses.is_dataclass(result), path
    assert set(model_specs()) == EXPECTED_SPECS
    for name in model_specs():
        assert model_spec(name).name == name  # the name inside matches the file


def _transformer_class():
    try:
        from sanaflow.models import SanaTransformer
    except ImportError:
        SanaTransformer = None
    from diffusers import SanaTransformer2DModel

    return SanaTransformer or SanaTransformer2DModel, SanaTransformer2DModel


@pytest.mark.parametrize(
    "name, millions",
    [("sana-600m-512", 591.7), ("sana-600m-1024", 591.7), ("sana-1600m-1024", 1604.5),
     ("sana-1600m-2k", 1604.5), ("sana-1600m-4k", 1604.5)],
)
def test_transformer_specs_build_with_documented_parameter_counts(name, millions):
    cls, reference = _transformer_class()
    spec = model_spec(name)
    assert set(spec.transformer) <= set(inspect.signature(reference.__init__).parameters)
    with torch.device("meta"):
        model = cls(**spec.transformer)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) / millions < 1e-3, count


def test_every_spec_is_consistent_and_builds():
    from diffusers import AutoencoderDC
    from transformers import Gemma2Config

    cls, reference = _transformer_class()
    vae_keys = set(inspect.signature(AutoencoderDC.__init__).parameters)
    for name in model_specs():
        spec = model_spec(name)
        t = spec.transformer
        assert set(t) <= set(inspect.signature(reference.__init__).parameters), name
        assert set(spec.vae) <= vae_keys, name
        compression = 2 ** (len(spec.vae["encoder_block_out_channels"]) - 1)  # DC-AE: 2x per stage after the first
        assert t["sample_size"] * compression == spec.resolution, name
        assert t["in_channels"] == spec.vae["latent_channels"], name
        with torch.device("meta"):
            cls(**t)
            vae = AutoencoderDC(**spec.vae)
        # the checks a config.json of this spec meets when loaded (the 2K / 4K specs hold float scales)
        cls.validate_config(t, name)
        DCAE.validate_config(spec.vae, name)
        if spec.text_encoder.type == "gemma2":
            assert Gemma2Config(**spec.text_encoder.config).hidden_size == t["caption_channels"], name
        else:
            assert t["caption_channels"] == 384, name  # all-MiniLM-L6-v2
        if name.startswith("sana-"):
            assert sum(p.numel() for p in vae.parameters()) / 1e6 == pytest.approx(312.25, rel=1e-3)
    sprint = model_spec("sana-sprint-1600m-1024")
    assert sprint.transformer["qk_norm"] == "rms_norm_across_heads" and sprint.transformer["guidance_embeds"]
    assert sprint.sampling.sampler == "scm" and sprint.scheduler.type == "scm"
    assert model_spec("sana-1600m-4k").transformer["interpolation_scale"] == 2.0
    assert model_spec("sana-1600m-4k").scheduler.flow_shift == 6.0


def test_scheduler_spec_matches_diffusers_and_sanaflow_schedules():
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SCMScheduler

    from sanaflow.sampling import SAMPLERS, schedule_from_scheduler_config
    from sanaflow.sampling.schedules import SCM_INTERMEDIATE_TIMESTEP, SCM_MAX_TIMESTEP

    for name in ("sana-600m-1024", "sana-1600m-4k"):
        conf = model_spec(name).scheduler.diffusers_config()
        ref = DPMSolverMultistepScheduler.from_config(conf)
        ref.set_timesteps(20)
        assert torch.equal(schedule_from_scheduler_config(conf, 20).sigmas, ref.sigmas)
    conf = model_spec("sana-600m-1024", ["scheduler.type=flow-euler"]).scheduler.diffusers_config()
    ref = FlowMatchEulerDiscreteScheduler.from_config(conf)
    ref.set_timesteps(20)
    assert torch.equal(schedule_from_scheduler_config(conf, 20).sigmas, ref.sigmas)
    assert SCMScheduler.from_config(model_spec("sana-sprint-1600m-1024").scheduler.diffusers_config()).config[
        "sigma_data"] == 0.5
    # config choices and defaults are the sampling module's own
    hints = typing.get_type_hints(SamplingConfig)
    assert set(typing.get_args(hints["sampler"])) == set(SAMPLERS)
    assert SamplingConfig().max_timestep == pytest.approx(SCM_MAX_TIMESTEP)
    assert SamplingConfig().intermediate_timestep == SCM_INTERMEDIATE_TIMESTEP
