"""Weight-file variants (fp16 / bf16 files beside the default ones, as the official SANA repos ship them):
local loading, the files a hub download fetches, and the pipelines' per-component fallback."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from sanaflow.errors import CheckpointError, InputError, SanaflowError
from sanaflow.hub import (
    check_variant,
    component_variant,
    find_weight_files,
    select_repo_files,
    weight_file_variant,
    weight_variants,
)

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("name, variant", [
    ("diffusion_pytorch_model.safetensors", ""),
    ("diffusion_pytorch_model-00001-of-00002.safetensors", ""),
    ("diffusion_pytorch_model.safetensors.index.json", ""),
    ("diffusion_pytorch_model.fp16.safetensors", "fp16"),
    ("diffusion_pytorch_model.fp16-00002-of-00002.safetensors", "fp16"),
    ("diffusion_pytorch_model.safetensors.index.fp16.json", "fp16"),
    ("model.bf16-00001-of-00003.safetensors", "bf16"),
    ("model.safetensors.index.bf16.json", "bf16"),
    ("config.json", None),
    ("diffusion_pytorch_model.bin", None),
    ("tokenizer.json", None),
])
def test_weight_file_variant_names(name, variant):
    assert weight_file_variant(name) == variant


@pytest.mark.parametrize("bad", ["", "fp 16", "../x", 16, "fp16.safetensors"])
def test_bad_variant_names(bad):
    with pytest.raises(InputError, match="variant"):
        check_variant(bad)


# The layout of an official SANA diffusers repo: fp32 files and fp16 variants in transformer/ and
# text_encoder/, a vae/ with default weights only, sample images and a pickle checkpoint folder.
REPO = [
    "README.md", "model_index.json", "asset/sample.png", ".gitattributes",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer.json", "tokenizer/tokenizer.model", "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "transformer/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/config.json",
    "text_encoder/model-00001-of-00003.safetensors", "text_encoder/model-00002-of-00003.safetensors",
    "text_encoder/model-00003-of-00003.safetensors", "text_encoder/model.safetensors.index.json",
    "text_encoder/model.fp16-00001-of-00002.safetensors", "text_encoder/model.fp16-00002-of-00002.safetensors",
    "text_encoder/model.safetensors.index.fp16.json",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "checkpoints/Sana_1600M_1024px.pth",
    "bf16only/config.json", "bf16only/diffusion_pytorch_model.bf16.safetensors",
]
COMMON = {"README.md", "model_index.json", ".gitattributes", "scheduler/scheduler_config.json",
          "tokenizer/tokenizer.json", "tokenizer/tokenizer.model", "tokenizer/tokenizer_config.json",
          "tokenizer/special_tokens_map.json", "transformer/config.json", "text_encoder/config.json",
          "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "bf16only/config.json",
          "bf16only/diffusion_pytorch_model.bf16.safetensors"}


def test_repo_files_fetch_one_precision_per_folder():
    default = set(select_repo_files(REPO))
    assert default == COMMON | {f for f in REPO if f.startswith(("transformer/", "text_encoder/"))
                                and weight_file_variant(f.split("/")[-1]) == ""}
    half = set(select_repo_files(REPO, variant="fp16"))
    assert half == COMMON | {"transformer/diffusion_pytorch_model.fp16.safetensors",
                             "text_encoder/model.fp16-00001-of-00002.safetensors",
                             "text_encoder/model.fp16-00002-of-00002.safetensors",
                             "text_encoder/model.safetensors.index.fp16.json"}
    # no images, no loose pickle checkpoints; a model folder with pickle weights only keeps them
    assert "asset/sample.png" not in default and "checkpoints/Sana_1600M_1024px.pth" not in default
    old = ["unet/config.json", "unet/diffusion_pytorch_model.bin"]
    assert select_repo_files(old) == sorted(old)
    sub = set(select_repo_files(REPO, subfolder="transformer", variant="fp16"))
    assert sub == {"model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.fp16.safetensors"}


def test_download_asks_only_for_the_selected_files(tmp_path, monkeypatch):
    import huggingface_hub

    from sanaflow.hub import resolve_model_path

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)  # 'owner/name' is not a local folder
    asked = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, **kw: list(REPO))

    def fake_snapshot(repo, allow_patterns=None, local_files_only=False, **kw):
        asked.update(repo=repo, patterns=allow_patterns, local=local_files_only)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert resolve_model_path("owner/sana", variant="fp16") == tmp_path
    assert asked["repo"] == "owner/sana" and not asked["local"]
    assert set(asked["patterns"]) == set(select_repo_files(REPO, variant="fp16"))


def _tiny_transformer(seed: int = 0):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    net = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                 num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                 cross_attention_dim=16, caption_channels=16, sample_size=8)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net


def test_transformer_variant_files_load_like_diffusers(tmp_path):
    from sanaflow.models import SanaTransformer

    ref = _tiny_transformer()
    ref.save_pretrained(tmp_path)  # default float32 files
    ref.to(torch.float16).save_pretrained(tmp_path, variant="fp16")  # + diffusion_pytorch_model.fp16.safetensors
    assert weight_variants(tmp_path) == {"", "fp16"}
    assert [f.name for f in find_weight_files(tmp_path, variant="fp16")] == ["diffusion_pytorch_model.fp16.safetensors"]
    full = SanaTransformer.from_pretrained(tmp_path)
    half = SanaTransformer.from_pretrained(tmp_path, variant="fp16")
    expected = diffusers.SanaTransformer2DModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float32)
    for name, value in expected.state_dict().items():
        assert half.state_dict()[name].dtype == torch.float32  # cast to the asked dtype (default float32)
        assert torch.equal(half.state_dict()[name], value), name
    diff = max((a - b).abs().max().item() for a, b in zip(full.state_dict().values(), half.state_dict().values()))
    assert 0 < diff < 1e-2  # the fp16 file is the rounded weights, not the float32 ones
    with pytest.raises(CheckpointError, match=r"no 'bf16' variant.*\(default\), fp16"):
        SanaTransformer.from_pretrained(tmp_path, variant="bf16")


def test_a_folder_of_variant_files_only(tmp_path):
    from sanaflow.models import SanaTransformer

    ref = _tiny_transformer()
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "one", variant="bf16")
    loaded = SanaTransformer.from_pretrained(tmp_path / "one")  # the only weights there: no variant needed
    assert torch.equal(loaded.proj_out.weight, ref.proj_out.weight.float())
    assert component_variant(tmp_path / "one", None) == "bf16"
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    ref.to(torch.float16).save_pretrained(tmp_path / "two", variant="fp16")
    with pytest.raises(CheckpointError, match=r"only variant weights \(bf16, fp16\).*variant="):
        SanaTransformer.from_pretrained(tmp_path / "two")
    assert SanaTransformer.from_pretrained(tmp_path / "two", variant="fp16").proj_out.weight.dtype == torch.float32


def test_component_variant_falls_back_with_a_warning(tmp_path, caplog):
    ref = _tiny_transformer()
    ref.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sanaflow.hub"):
        assert component_variant(tmp_path, "fp16") is None
    assert "no 'fp16' variant" in caplog.text
    assert component_variant(tmp_path, None) is None


def test_pipeline_variant_matches_diffusers(tmp_path):
    import sanaflow
    from tiny_sana import save_tiny_sana

    folder = save_tiny_sana(tmp_path / "sana", sample_size=8)
    ref = diffusers.SanaPipeline.from_pretrained(folder)
    ref.transformer.to(torch.float16).save_pretrained(folder / "transformer", variant="fp16")
    ref.text_encoder.to(torch.float16).save_pretrained(folder / "text_encoder", variant="fp16")
    # vae/ keeps its default weights only: both libraries fall back to them
    expected_pipe = diffusers.SanaPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32)
    expected_pipe.set_progress_bar_config(disable=True)
    ours = sanaflow.load_pipeline(folder, device="cpu", variant="fp16")
    plain = sanaflow.load_pipeline(folder, device="cpu")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    kw = dict(height=32, width=32, num_inference_steps=3, guidance_scale=4.5, latents=latents, output_type="pt",
              use_resolution_binning=False)
    expected = expected_pipe("a red star", **kw).images
    got = ours("a red star", **kw).images
    assert (got - expected).abs().max().item() <= 1e-3
    assert torch.equal(ours.transformer.proj_out.weight, expected_pipe.transformer.proj_out.weight)
    assert not torch.equal(plain.transformer.proj_out.weight, ours.transformer.proj_out.weight)


def test_cli_variant_option(tmp_path, capsys):
    from sanaflow.cli import main
    from tiny_sana import save_tiny_sana

    folder = save_tiny_sana(tmp_path / "sana", sample_size=8)
    out = tmp_path / "img.png"
    assert main(["generate", "a red star", "--model", str(folder), "--variant", "fp16", "--steps", "2",
                 "--size", "32x32", "--seed", "0", "--out", str(out), "--quiet"]) == 0  # no fp16 files: default ones
    assert out.is_file()
    capsys.readouterr()
    assert main(["generate", "a red star", "--model", str(folder), "--variant", "fp 16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "variant must be" in err and len(err.strip().splitlines()) == 1


def test_quantized_folders_have_no_variants(tmp_path):
    from sanaflow.models import SanaTransformer
    from sanaflow.quant import quantize_transformer, save_quantized

    ours = SanaTransformer.from_config(dict(_tiny_transformer().config))
    quantize_transformer(ours, "int8")
    save_quantized(ours, tmp_path / "q")
    with pytest.raises(SanaflowError, match="quantized.*no variants"):
        SanaTransformer.from_pretrained(tmp_path / "q", variant="fp16")


def test_sd_backbone_reads_variant_files_and_keys_the_cache_by_them(sd_folder, tmp_path):
    from diffusers import UNet2DConditionModel

    from sanaflow.tokenflow.backbones import load_backbone

    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)  # fp16 files that differ from the default ones beyond rounding
    unet.to(torch.float16).save_pretrained(folder / "unet", variant="fp16")
    plain = load_backbone(folder)
    half = load_backbone(folder, variant="fp16")  # vae/ and text_encoder/ have no fp16 files: default ones
    expected = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", variant="fp16", torch_dtype=torch.float32)
    assert torch.equal(half.unet.conv_in.weight, expected.conv_in.weight)
    assert not torch.equal(half.unet.conv_in.weight, plain.unet.conv_in.weight)
    assert half.name.endswith("@fp16") and half.name != plain.name  # inversions of one never serve the other
    assert load_backbone(folder, variant="bf16").name == plain.name  # no bf16 files anywhere: the default weights
