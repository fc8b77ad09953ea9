"""Input checks of training configs (model sizes, loss weights) and of `from_pretrained(device=...)`.

The config checks run in `validate`, before any model is built (the `no_models` fixture makes a build
fail loudly); the device checks run before any weights load, so they pass on a machine without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sanaflow.config import load_config
from sanaflow.errors import ConfigError, InputError
from sanaflow.models import SanaTransformer
from sanaflow.training import TrainConfig, build_task, validate
from test_training import tiny_config, write_yaml

TRANSFORMER = Path(__file__).resolve().parents[1] / "src" / "sanaflow" / "assets" / "shapes-tiny" / "transformer"


def _config(tmp_path: Path, *overrides: str) -> TrainConfig:
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny_config(tmp_path / "run"))
    return load_config(cfg, TrainConfig, list(overrides))


# ---- model sizes (each used to fail inside the constructor, or to build a degenerate network) ----

DCAE_BAD = [
    ("model.vae.latent_channels=0", r"model\.vae\.latent_channels must be an integer >= 1 \(a size or count\), got 0"),
    ("model.vae.in_channels=0", r"model\.vae\.in_channels must be an integer >= 1"),
    ("model.vae.attention_head_dim=0", r"model\.vae\.attention_head_dim must be an integer >= 1"),
    ("model.vae.encoder_block_out_channels=[8,8,0]",
     r"model\.vae\.encoder_block_out_channels\[2\] must be an integer >= 1 .*got 0"),
    ("model.vae.decoder_block_out_channels=[0,8,8]", r"model\.vae\.decoder_block_out_channels\[0\] must be an integer >= 1"),
    ("model.vae.encoder_qkv_multiscales=[[],[0],[]]", r"model\.vae\.encoder_qkv_multiscales\[1\]\[0\] must be an integer >= 1"),
    ("model.vae.scaling_factor=0", r"model\.vae\.scaling_factor must be a finite number > 0, got 0"),
    ("model.vae.scaling_factor=.nan", r"model\.vae\.scaling_factor must be a finite number > 0, got nan"),
    ("model.vae.scaling_factor=.inf", r"model\.vae\.scaling_factor must be a finite number > 0, got inf"),
]

TRANSFORMER_BAD = [
    ("model.transformer.in_channels=0", r"model\.transformer\.in_channels must be an integer >= 1"),
    ("model.transformer.num_attention_heads=0", r"model\.transformer\.num_attention_heads must be an integer >= 1"),
    ("model.transformer.attention_head_dim=0", r"model\.transformer\.attention_head_dim must be an integer >= 1"),
    ("model.transformer.num_layers=0", r"model\.transformer\.num_layers must be an integer >= 1"),
    ("model.transformer.num_cross_attention_heads=0", r"model\.transformer\.num_cross_attention_heads must be an integer >= 1"),
    ("model.transformer.cross_attention_head_dim=0", r"model\.transformer\.cross_attention_head_dim must be an integer >= 1"),
    ("model.transformer.cross_attention_dim=0", r"model\.transformer\.cross_attention_dim must be an integer >= 1"),
    ("model.transformer.caption_channels=0", r"model\.transformer\.caption_channels must be an integer >= 1"),
    ("model.transformer.patch_size=0", r"model\.transformer\.patch_size must be an integer >= 1"),
    ("model.transformer.sample_size=0", r"model\.transformer\.sample_size must be an integer >= 1"),
    ("model.transformer.mlp_ratio=0", r"model\.transformer\.mlp_ratio must be a finite number > 0"),
    ("model.transformer.interpolation_scale=0", r"model\.transformer\.interpolation_scale must be a finite number > 0"),
]


@pytest.mark.parametrize("override, message", DCAE_BAD, ids=[o for o, _ in DCAE_BAD])
def test_dcae_sizes_are_checked_before_building(tmp_path, no_models, override, message):
    cfg = _config(tmp_path, "task=dcae", override)
    with pytest.raises(ConfigError, match=message):
        build_task(cfg)


@pytest.mark.parametrize("override, message", TRANSFORMER_BAD, ids=[o for o, _ in TRANSFORMER_BAD])
def test_transformer_sizes_are_checked_before_building(tmp_path, no_models, override, message):
    with pytest.raises(ConfigError, match=message):
        build_task(_config(tmp_path, override))


def test_t2i_checks_the_vae_config_it_builds(tmp_path, no_models):
    # t2i without model.vae_path builds the DC-AE from model.vae, so its sizes are checked too
    with pytest.raises(ConfigError, match=r"model\.vae\.latent_channels must be an integer >= 1"):
        build_task(_config(tmp_path, "model.vae.latent_channels=0"))


@pytest.mark.parametrize("overrides", [
    ["task=dcae", "model.vae.encoder_layers_per_block=[0,1,1]"],  # an empty first stage (as in DC-AE f64)
    ["task=dcae", "model.vae.decoder_layers_per_block=[0,1,1]", "model.vae.scaling_factor=0.41407"],
    ["model.transformer.out_channels=0"],  # 0 (like null) means out_channels = in_channels
    ["model.transformer.cross_attention_dim=null", "model.transformer.num_cross_attention_heads=null",
     "model.transformer.cross_attention_head_dim=null", "model.transformer.interpolation_scale=null"],
])
def test_valid_model_sizes_are_accepted(tmp_path, overrides):
    validate(_config(tmp_path, *overrides))


def test_dcae_with_an_empty_first_stage_still_builds(tmp_path):
    task = build_task(_config(tmp_path, "task=dcae", "model.vae.encoder_layers_per_block=[0,1,1]"))
    assert task.loss.net.config.encoder_layers_per_block[0] == 0


# ---- loss weights ----

def test_all_zero_dcae_loss_weights_are_refused(tmp_path, no_models):
    cfg = _config(tmp_path, "task=dcae", "dcae.l1=0", "dcae.l2=0", "dcae.freq=0", "dcae.adv=0")
    with pytest.raises(ConfigError, match=r"dcae\.l1, dcae\.l2, dcae\.freq and dcae\.adv are all 0.*"
                                          r"at least one loss weight must be > 0"):
        build_task(cfg)


@pytest.mark.parametrize("overrides", [
    ["task=dcae", "dcae.l1=0", "dcae.l2=0", "dcae.freq=0.1"],
    ["task=dcae", "dcae.l1=0", "dcae.l2=0", "dcae.freq=0", "dcae.adv=0.1"],
    # t2i: the velocity term has weight 1 always, so zero DC-AE weights (unused there) are fine
    ["dcae.l1=0", "dcae.l2=0", "dcae.freq=0"],
])
def test_some_loss_weight_above_zero_is_accepted(tmp_path, overrides):
    validate(_config(tmp_path, *overrides))


# ---- from_pretrained(device=...) ----

@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory) -> Path:
    from sanaflow.quant import quantize_transformer, save_quantized

    model = quantize_transformer(SanaTransformer.from_pretrained(TRANSFORMER), "int8")
    return save_quantized(model, tmp_path_factory.mktemp("quant") / "transformer")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("kind", ["plain", "int8"])
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_cuda_device_without_cuda_is_an_input_error(request, no_cuda, kind, device):
    folder = TRANSFORMER if kind == "plain" else request.getfixturevalue("quantized_folder")
    name = str(torch.device(device))
    with pytest.raises(InputError, match=rf"device '{name}' requested but CUDA is not available "
                                         r"\(torch\.cuda\.is_available\(\) is False\); use device='cpu'"):
        SanaTransformer.from_pretrained(folder, device=device)


def test_cuda_index_beyond_device_count_is_an_input_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match=r"device 'cuda:3' requested but only 1 CUDA device\(s\) are visible; "
                                         r"use cuda:0 to cuda:0, or device='cpu'"):
        SanaTransformer.from_pretrained(TRANSFORMER, device="cuda:3")


def test_unavailable_mps_is_an_input_error(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(InputError, match=r"device 'mps' requested but MPS is not available.*use device='cpu'"):
        SanaTransformer.from_pretrained(TRANSFORMER, device="mps")


@pytest.mark.parametrize("kind", ["plain", "int8"])
def test_cpu_device_still_loads(request, kind):
    folder = TRANSFORMER if kind == "plain" else request.getfixturevalue("quantized_folder")
    model = SanaTransformer.from_pretrained(folder, device="cpu")
    assert model.device == torch.device("cpu")


def test_unknown_device_is_still_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown device 'gpu'; use cpu, cuda or cuda:N"):
        SanaTransformer.from_pretrained(TRANSFORMER, device="gpu")


@pytest.mark.parametrize("device", ["meta", "xla"])
def test_devices_without_weights_or_support_are_refused_before_loading(device):
    from sanaflow.hub import builtin_path

    with pytest.raises(ConfigError, match="unsupported device"):
        SanaTransformer.from_pretrained(builtin_path("sanaflow/shapes-tiny"), subfolder="transformer", device=device)
