"""DCAE: parity with diffusers' AutoencoderDC, tiling, input checks, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from sanaflow.errors import ConfigError, SanaflowError
from sanaflow.models import DCAE
from sanaflow.models.dc_ae import AUTO_TILE_PIXELS, run_tiled, tile_starts, tile_weights

diffusers = pytest.importorskip("diffusers")

# SANA-1.0 layout (mit-han-lab/dc-ae-f32c32-sana-1.0): ResBlock x3 then EfficientViTBlock x3,
# qkv multiscales (5,), strided-conv down, interpolate up, rms norm, silu; channels scaled down.
SANA_LAYOUT = dict(
    latent_channels=8,
    attention_head_dim=8,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(8, 16, 16, 32, 32, 32),
    decoder_block_out_channels=(8, 16, 16, 32, 32, 32),
    encoder_layers_per_block=(1, 1, 1, 2, 2, 2),
    decoder_layers_per_block=(1, 1, 1, 2, 2, 2),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    upsample_block_type="interpolate",
    downsample_block_type="Conv",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)
# AutoencoderDC() defaults (all ResBlock, pixel-unshuffle / pixel-shuffle, rms norm, silu), scaled down.
DEFAULT_LAYOUT = dict(
    latent_channels=8,
    encoder_block_out_channels=(8, 16, 16, 32, 32, 32),
    decoder_block_out_channels=(8, 16, 16, 32, 32, 32),
    encoder_layers_per_block=(1, 1, 1, 2, 2, 2),
    decoder_layers_per_block=(1, 1, 1, 2, 2, 2),
)
# The other switches the config allows: empty first stage, two qkv scales, per-stage batch/rms
# norms and activations, no latent shortcuts, another output activation; f = 8.
MIXED_LAYOUT = dict(
    latent_channels=8,
    attention_head_dim=8,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 16, 32, 32),
    decoder_block_out_channels=(8, 16, 32, 32),
    encoder_layers_per_block=(0, 1, 1, 2),
    decoder_layers_per_block=(0, 1, 1, 2),
    encoder_qkv_multiscales=((), (), (3, 5), (5,)),
    decoder_qkv_multiscales=((), (), (3, 5), (5,)),
    decoder_norm_types=("batch_norm", "batch_norm", "rms_norm", "batch_norm"),
    decoder_act_fns=("relu", "relu", "silu", "gelu"),
    encoder_out_shortcut=False,
    decoder_in_shortcut=False,
    decoder_conv_act_fn="silu",
    downsample_block_type="conv",  # the conversion script's spelling (SANA_LAYOUT has "Conv")
)
LAYOUTS = {"sana": SANA_LAYOUT, "default": DEFAULT_LAYOUT, "mixed": MIXED_LAYOUT}


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter and norm statistic non-default random values (fan-in scaled)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each layout as a randomised diffusers AutoencoderDC, written with its save_pretrained."""
    out = {}
    for name, cfg in LAYOUTS.items():
        ref = diffusers.AutoencoderDC(**cfg).eval()
        randomise(ref)
        folder = tmp_path_factory.mktemp(f"dcae_{name}")
        ref.save_pretrained(folder)
        out[name] = (ref, folder)
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parity_with_diffusers(saved, layout):
    ref, folder = saved[layout]
    ours = DCAE.from_pretrained(folder)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    assert ours.spatial_compression_ratio == ref.spatial_compression_ratio
    f = ours.spatial_compression_ratio
    # a 4x3 latent (linear attention) and a 1x2 one (the reference's small-map quadratic branch)
    for h, w in [(4 * f, 3 * f), (f, 2 * f)]:
        x = torch.rand(2, 3, h, w) * 2 - 1
        with torch.no_grad():
            z_ref = ref.encode(x).latent
            z = ours.encode(x)
            img_ref = ref.decode(z_ref).sample
            img = ours.decode(z_ref)
        assert z.shape == z_ref.shape == (2, 8, h // f, w // f)
        assert (z - z_ref).abs().max().item() <= 1e-4, (layout, h, w)
        assert (img - img_ref).abs().max().item() <= 1e-4, (layout, h, w)
        assert img.shape == x.shape


def test_return_dict_wraps_like_diffusers(saved):
    ref, folder = saved["sana"]
    ours = DCAE.from_pretrained(folder)
    f = ours.spatial_compression_ratio
    x = torch.rand(1, 3, 2 * f, 2 * f) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x)
        img = ours.decode(z)
        enc, dec = ours.encode(x, return_dict=True), ours.decode(z, return_dict=True)
        enc_t, dec_t = ours.encode(x, return_dict=False), ours.decode(z, return_dict=False)
        ref_enc, ref_dec = ref.encode(x), ref.decode(z)  # diffusers' defaults: return_dict=True
    assert torch.equal(enc.latent, z) and torch.equal(enc[0], z) and torch.equal(enc_t[0], z) and len(enc_t) == 1
    assert torch.equal(dec.sample, img) and torch.equal(dec[0], img) and torch.equal(dec_t[0], img) and len(dec_t) == 1
    assert (enc.latent - ref_enc.latent).abs().max().item() <= 1e-4
    assert (dec.sample - ref_dec.sample).abs().max().item() <= 1e-4
    empty = ours.decode(z[:0], return_dict=False)[0]  # the empty-batch shortcut is wrapped too
    assert empty.shape == (0, 3, 2 * f, 2 * f)


def test_config_and_round_trip(saved, tmp_path):
    ref, folder = saved["sana"]
    ours = DCAE.from_pretrained(folder)
    assert ours.config.scaling_factor == pytest.approx(0.41407)
    assert ours.scaling_factor == pytest.approx(0.41407)
    assert ours.spatial_compression_ratio == 32
    ours.save_pretrained(tmp_path / "rt")
    cfg = json.loads((tmp_path / "rt" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderDC"
    assert cfg["upsample_block_type"] == "interpolate"
    again = DCAE.from_pretrained(tmp_path / "rt")
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # diffusers reads our folder back too
    back = diffusers.AutoencoderDC.from_pretrained(tmp_path / "rt").eval()
    z = torch.randn(1, 8, 2, 3)
    with torch.no_grad():
        assert (back.decode(z).sample - again.decode(z)).abs().max().item() <= 1e-4


def test_bad_inputs(saved):
    ours = DCAE.from_pretrained(saved["sana"][1])
    with pytest.raises(SanaflowError, match=r"4 channels.*expects 8"):
        ours.decode(torch.randn(1, 4, 2, 2))
    with pytest.raises(SanaflowError, match=r"100x64 is not divisible by the compression ratio 32"):
        ours.encode(torch.randn(1, 3, 100, 64))
    with pytest.raises(SanaflowError, match=r"\(B, 3, H, W\)"):
        ours.encode(torch.randn(3, 64, 64))
    with pytest.raises(SanaflowError, match="tiling must be"):
        ours.decode(torch.randn(1, 8, 2, 2), tiling="yes")
    with pytest.raises(SanaflowError, match="multiples of 32"):
        ours.tiled_decode(torch.randn(1, 8, 2, 2), tile=100, overlap=32)
    with pytest.raises(SanaflowError, match="smaller than the tile"):
        ours.tiled_decode(torch.randn(1, 8, 2, 2), tile=64, overlap=64)
    with pytest.raises(ConfigError, match="unknown block type 'ResNet'"):
        DCAE(encoder_block_types="ResNet")
    with pytest.raises(ConfigError, match="one per stage"):
        DCAE(decoder_norm_types=("rms_norm",) * 3)
    with pytest.raises(ConfigError, match="unknown downsample_block_type 'strided'"):
        DCAE(downsample_block_type="strided")
    assert DCAE(**{**SANA_LAYOUT, "downsample_block_type": "CONV"}).config["downsample_block_type"] == "CONV"
    with pytest.raises(ConfigError, match="decoder stage 0: an EfficientViTBlock with 4 channels"):
        DCAE(**{**SANA_LAYOUT, "decoder_block_types": ("EfficientViTBlock",) * 6,
                "decoder_block_out_channels": (4, 16, 16, 32, 32, 32)})


# Tiling. tiled_decode / tiled_encode run the attention stages on the whole (small) map and the
# conv-only stages in tiles whose overlap covers their receptive field, so by default tiled and
# untiled agree to float rounding: stated tolerance 1e-4 (max abs, images in about [-1, 1],
# latents of std ~10), on maps of several tiles in each direction.
TILE_TOL = 1e-4


@pytest.mark.parametrize("layout", ["sana", "mixed"])
def test_tiled_decode_and_encode_match_untiled(saved, layout):
    ours = DCAE.from_pretrained(saved[layout][1])
    f = ours.spatial_compression_ratio
    h, w = (384, 320) if f == 32 else (256, 192)
    tile = 256 if f == 32 else 128  # 2 x 2 tiles (f32), 3 x 2 tiles (f8)
    z = torch.randn(1, 8, h // f, w // f)
    x = torch.rand(1, 3, h, w) * 2 - 1
    with torch.no_grad():
        full = ours.decode(z, tiling=False)
        # chunk=160: the whole-map attention stages also run in strips of a few rows (two-pass attention)
        tiled = ours.tiled_decode(z, tile=tile, tile_batch=4, chunk=160)
        assert tiled.shape == full.shape == (1, 3, h, w)
        assert (tiled - full).abs().max().item() <= TILE_TOL
        lat = ours.encode(x, tiling=False)
        lat_tiled = ours.tiled_encode(x, tile=tile, tile_batch=3, chunk=160)
        assert (lat_tiled - lat).abs().max().item() <= TILE_TOL * lat.abs().max().item()


@pytest.mark.parametrize("layout", ["sana", "mixed"])
def test_channels_last_decode_matches(saved, layout, monkeypatch):
    """The channels-last decode (CUDA's default) gives the contiguous path's numbers, tiled and untiled.

    Forced on the CPU here; the decoder's conv weights are converted once and back when the format changes.
    """
    from sanaflow.models import dc_ae

    ours = DCAE.from_pretrained(saved[layout][1])
    f = ours.spatial_compression_ratio
    z = torch.randn(1, 8, 384 // f, 320 // f)
    tile = 256 if f == 32 else 128
    with torch.no_grad():
        ref, ref_tiled = ours.decode(z, tiling=False), ours.tiled_decode(z, tile=tile, tile_batch=2, chunk=160)
        monkeypatch.setattr(dc_ae, "use_channels_last", lambda x: True)
        out, out_tiled = ours.decode(z, tiling=False), ours.tiled_decode(z, tile=tile, tile_batch=2, chunk=160)
        assert ours.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        monkeypatch.setattr(dc_ae, "use_channels_last", lambda x: False)
        back = ours.decode(z, tiling=False)
    assert ours.decoder.conv_in.weight.is_contiguous()
    for a, b in [(out, ref), (out_tiled, ref_tiled), (back, ref)]:
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5
    monkeypatch.undo()
    assert not dc_ae.use_channels_last(torch.zeros(1))  # on the CPU never by default
    meta = torch.zeros(1, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # a stand-in CUDA tensor
    with torch.no_grad():
        assert dc_ae.use_channels_last(meta)  # CUDA inference: on
        monkeypatch.setenv(dc_ae.CHANNELS_LAST_ENV, "0")
        assert not dc_ae.use_channels_last(meta)  # switched off
    monkeypatch.delenv(dc_ae.CHANNELS_LAST_ENV)
    with torch.enable_grad():
        assert not dc_ae.use_channels_last(meta)  # training keeps the parameters' layout


def test_auto_tiling_bounds_live_memory_of_the_real_decoder_at_4096():
    """The SANA-1.0 f32c32 decoder at full size on the meta device (no arithmetic): with the default
    tiling a 4096 px decode keeps at most 1.4 GiB of bf16 activations alive (the GPU adds the 0.58 GiB
    of weights: measured 1.89 GiB on an H100), where the untiled decode holds over 8 GiB."""
    from bench_scripts import load_bench_script

    memory = load_bench_script("dcae_memory")
    from _common import DC_AE_F32C32

    tiled = memory.decode_live_peak(DC_AE_F32C32, 4096)
    untiled = memory.decode_live_peak(DC_AE_F32C32, 4096, tiling=False)
    assert tiled.peak <= 1.4 * 2**30 < 8 * 2**30 < untiled.peak
    # besides the 3-channel output buffer, no live map is wider than one tile (1,024 px + overlap)
    assert max(s[-1] for _, s, _ in tiled.at_peak if s[1] > 3) <= 1024 + 2 * 64


def test_tiles_partition_and_exact_on_a_local_function():
    # weights of each axis sum to one at every output position, for odd geometries too
    for size, tile, overlap, halo, scale in [(40, 12, 4, 2, 8), (37, 16, 6, 3, 1), (9, 4, 3, 1, 2), (20, 20, 4, 2, 4)]:
        starts, t = tile_starts(size, tile, overlap)
        assert t <= tile and starts[0] == 0 and starts[-1] + t == size
        assert all(b - a + overlap <= t for a, b in zip(starts, starts[1:]))  # overlaps >= requested
        w = tile_weights(starts, t, scale, halo)
        total = torch.zeros(size * scale)
        for s0, wk in zip(starts, w):
            total[s0 * scale: (s0 + t) * scale] += wk
        assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    # a local 2x-upsampling function of receptive-field radius 2 (grid units): exact when overlap >= 2 * halo
    conv = torch.nn.Conv2d(3, 3, 5, padding=2)

    def fn(t):
        return torch.nn.functional.interpolate(conv(t), scale_factor=2, mode="nearest")

    x = torch.randn(2, 3, 37, 29)
    with torch.no_grad():
        full = fn(x)
        exact = run_tiled(fn, x, tile=12, overlap=4, halo=2, in_scale=1, out_scale=2, tile_batch=5)
        approx = run_tiled(fn, x, tile=12, overlap=2, halo=2, in_scale=1, out_scale=2, tile_batch=1)
    assert (exact - full).abs().max().item() < 1e-5
    assert 1e-3 < (approx - full).abs().max().item() < (full.abs().max().item())


def test_tiling_policy(saved):
    ours = DCAE.from_pretrained(saved["sana"][1])
    side = int(AUTO_TILE_PIXELS**0.5)
    assert not ours.wants_tiling(side, side, "auto")
    assert ours.wants_tiling(side, side + 32, "auto")
    assert ours.wants_tiling(64, 64, True) and not ours.wants_tiling(8192, 8192, False)
    z = torch.randn(1, 8, 4, 4)
    with torch.no_grad():  # tiling=True takes the tiled path (3 x 3 tiles of 96 px here)
        assert torch.equal(ours.decode(z, tiling=True, tile=96), ours.tiled_decode(z, tile=96))
        assert (ours.decode(z, tiling=True, tile=96) - ours.decode(z)).abs().max().item() <= TILE_TOL
    # the receptive field does not fit a tiny tile: a clear error, not a silently wrong image
    with pytest.raises(SanaflowError, match="use a larger tile"):
        ours.tiled_decode(torch.randn(1, 8, 8, 8), tile=64)


def test_gradient_checkpointing_gives_same_gradients(saved):
    ours = DCAE.from_pretrained(saved["sana"][1]).train()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    grads = []
    for ckpt in (False, True):
        if ckpt:
            ours.enable_gradient_checkpointing()
        ours.zero_grad()
        loss = (ours(x) - x).pow(2).mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
    ours.disable_gradient_checkpointing()
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)
