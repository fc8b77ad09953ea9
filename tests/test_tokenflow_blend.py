"""Local blending (`sanaflow.tokenflow.blend`): DiffEdit-style edit masks and the per-step blend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sanaflow.errors import ConfigError
from sanaflow.tokenflow.blend import (
    MASK_LEVELS,
    blend,
    difference_maps,
    edit_masks,
    mask_steps,
    masks_from_differences,
    paste_source,
)
from sanaflow.tokenflow.editor import MODES, EditSettings, edit_latents
from sanaflow.tokenflow.inversion import InversionKey, LatentCache, step_key

# sd and sana (tiny random backbones) come from conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_mask_steps_pick_mid_schedule_indices():
    assert mask_steps(50) == [15, 20, 24, 29, 34]  # round(f * 49) for the default levels
    assert mask_steps(1) == [0]
    assert mask_steps(3, (0.0, 0.5, 1.0)) == [0, 1, 2]
    assert all(0 <= i < 7 for i in mask_steps(7, MASK_LEVELS))


def test_masks_threshold_each_frame_at_its_own_maximum():
    diff = torch.zeros(2, 9, 9)
    diff[0, 4, 4] = 1.0  # a peak in the middle
    diff[1, 2, 2] = 50.0  # a peak elsewhere, at another scale
    diff[1, 7, 7] = 10.0  # a fifth of frame 1's peak: under a 0.5 threshold
    m = masks_from_differences(diff, 0.5, grow=0)
    assert m.shape == (2, 1, 9, 9) and m.dtype == torch.float32
    # the 3x3 mean smooths a lone peak into its 3x3 neighbourhood, all at 1/9 of it: the whole block passes
    assert m[0, 0, 3:6, 3:6].eq(1).all() and m[0].sum() == 9
    assert m[1, 0, 1:4, 1:4].eq(1).all() and m[1].sum() == 9 and m[1, 0, 7, 7] == 0
    grown = masks_from_differences(diff, 0.5, grow=1)
    assert grown[0, 0, 2:7, 2:7].eq(1).all() and grown[0].sum() == 25
    assert masks_from_differences(torch.zeros(1, 4, 4), 0.5).sum() == 0  # no difference: nothing to edit
    for bad in (0.0, 1.0, -0.5, float("nan")):
        with pytest.raises(ConfigError, match="threshold must lie in"):
            masks_from_differences(diff, bad)


def test_blend_is_a_masked_mix():
    a, b = torch.full((1, 2, 2, 2), 3.0), torch.full((1, 2, 2, 2), -1.0)
    m = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    out = blend(a, b, m)
    assert torch.equal(out[0, :, 0, 0], a[0, :, 0, 0]) and torch.equal(out[0, :, 0, 1], b[0, :, 0, 1])


def _cache(backbone, frames, steps, folder, seed=0):
    """A cache with random latents at each editing time (the masks and blends need no real inversion)."""
    g = torch.Generator().manual_seed(seed)
    times = backbone.timesteps(steps)
    latents = {step_key(i): torch.randn(frames, 4, 8, 8, generator=g) for i in range(steps)}
    latents["clean"] = torch.randn(frames, 4, 8, 8, generator=g)
    key = InversionKey(video=f"random{seed}", model=backbone.name, height=8, width=8, num_frames=frames,
                       steps=steps, inversion_steps=steps, prompt="a square")
    return LatentCache.write(folder, key, times, latents)


@pytest.mark.parametrize("which", ["sd", "sana"])
def test_difference_maps_equal_a_direct_computation(which, sd, sana, tmp_path):
    backbone = sd if which == "sd" else sana
    cache = _cache(backbone, 3, 6, tmp_path)
    conds = backbone.embed(["a square", "a big red circle"])
    got = difference_maps(backbone, cache, conds, batch_size=2)  # batches of 2 + 1 frames
    want = 0
    with torch.no_grad():
        for j in mask_steps(6):
            x, t = cache.latents(j), cache.timesteps[j]
            src = backbone.denoise(x, t, conds.take([0] * 3)).float()
            tar = backbone.denoise(x, t, conds.take([1] * 3)).float()
            want = want + (tar - src).abs().mean(dim=1)
    torch.testing.assert_close(got, want / len(mask_steps(6)), atol=1e-5, rtol=1e-4)
    assert got.shape == (3, 8, 8) and got.max() > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["sd", "sana"])
def test_outside_the_mask_the_edit_is_the_source(which, mode, sd, sana, tmp_path):
    backbone = sd if which == "sd" else sana
    cache = _cache(backbone, 2, 4, tmp_path)
    settings = EditSettings("a big red circle", source_prompt="a square", mode=mode, steps=4, batch_size=2,
                            guidance_scale=2.0, local_blend=0.6, strength=0.5)
    out = edit_latents(backbone, cache, settings)
    m = edit_masks(backbone, cache, "a square", "a big red circle", 0.6, 2)  # (T, 1, h, w)
    assert 0 < m.mean() < 1  # the tiny model's prompts differ somewhere, not everywhere
    clean = cache.clean()
    assert torch.equal(out * (1 - m), clean * (1 - m))  # the source's own clean latent, exactly
    plain = edit_latents(backbone, cache, EditSettings(**{**settings.__dict__, "local_blend": 0.0}))
    assert ((out - clean).abs() * m).max() > 1e-3  # inside, an edit
    assert (plain - clean).abs().max() > 1e-3 and not torch.equal(out, plain)


@pytest.mark.parametrize("which", ["sd", "sana"])
def test_same_prompts_give_back_the_source(which, sd, sana, tmp_path):
    """Identical prompts differ nowhere: the mask is empty and the blended edit is the source video."""
    backbone = sd if which == "sd" else sana
    cache = _cache(backbone, 2, 3, tmp_path)
    out = edit_latents(backbone, cache, EditSettings("a square", source_prompt="a square", steps=3, batch_size=2,
                                                     local_blend=0.5))
    assert torch.equal(out, cache.clean())


def test_defaults_and_validation(sd, sana, tmp_path):
    assert sd.default_local_blend == 0.0 and sana.default_local_blend == 0.5
    cache = _cache(sana, 2, 3, tmp_path)

    def edit(blend):
        return edit_latents(sana, cache, EditSettings("a red circle", source_prompt="a square", steps=3,
                                                      batch_size=2, local_blend=blend))

    assert torch.equal(edit(None), edit(0.5))  # None: the backbone's default
    assert not torch.equal(edit(0.0), edit(0.5))
    for bad in (-0.1, 1.0, 2.0, float("nan")):
        with pytest.raises(ConfigError, match=r"--local-blend must lie in \[0, 1\)"):
            EditSettings("x", local_blend=bad).validate()
    with pytest.raises(ConfigError, match="blend_grow"):
        EditSettings("x", blend_grow=-1).validate()


def test_paste_source_keeps_the_source_outside_the_upsampled_mask():
    rng = np.random.default_rng(0)
    edited = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    source = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    masks = torch.zeros(2, 1, 4, 4)
    masks[0, 0, 1:3, 1:3] = 1.0  # frame 0: the middle 2 x 2 latent pixels; frame 1: nothing
    out = paste_source(edited, source, masks, grow=0)
    assert out.dtype == np.uint8 and out.shape == edited.shape
    assert np.array_equal(out[1], source[1])  # an empty mask: the source frame itself
    assert np.array_equal(out[0, 14:18, 14:18], edited[0, 14:18, 14:18])  # the mask's middle: the edit
    # bilinear upsampling: latent pixel i sits at pixel 8 i + 3.5, so the ramp runs from 3.5 (0) to 11.5 (1)
    # and from 19.5 (1) to 27.5 (0); beyond it the source itself
    assert np.array_equal(out[0, :4], source[0, :4]) and np.array_equal(out[0, :, 28:], source[0, :, 28:])
    w = (8 - 3.5) / 8  # column 8 of a middle row: on the ramp, both mixed
    want = w * edited[0, 16, 8].astype(np.float32) + (1 - w) * source[0, 16, 8]
    assert np.abs(out[0, 16, 8].astype(np.float32) - want).max() <= 1.0
    grown = paste_source(edited, source, masks)  # the default grows the mask by one latent pixel first
    assert np.array_equal(grown[0, 8:24, 8:24], edited[0, 8:24, 8:24]) and np.array_equal(grown[1], source[1])
    assert not np.array_equal(grown[0, :4], source[0, :4])
    with pytest.raises(ConfigError, match="differ"):
        paste_source(edited, source[:, :16], masks)
    with pytest.raises(ConfigError, match="masks must be"):
        paste_source(edited, source, masks[:1])


def test_edit_returns_its_masks_and_the_pipeline_pastes_the_source_back(sana, tmp_path):
    from sanaflow.pipelines.video_edit import VideoEditPipeline

    cache = _cache(sana, 2, 3, tmp_path / "c")
    settings = EditSettings("a big red circle", source_prompt="a square", steps=3, batch_size=2, local_blend=0.6)
    latents, masks = edit_latents(sana, cache, settings, return_masks=True)
    assert torch.equal(latents, edit_latents(sana, cache, settings))
    assert torch.equal(masks, edit_masks(sana, cache, "a square", "a big red circle", 0.6, 2))
    off = EditSettings(**{**settings.__dict__, "local_blend": 0.0})
    assert edit_latents(sana, cache, off, return_masks=True)[1] is None

    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)  # an 8 x 8 latent: the mask covers a part
    pipe = VideoEditPipeline(sana, cache_dir=tmp_path / "p")
    kw = dict(source_prompt="a square", steps=3, batch_size=2, local_blend=0.9, progress=False)
    pasted = pipe(frames, "a big red circle", **kw)
    plain = pipe(frames, "a big red circle", paste_source=False, **kw)
    clean_masks = edit_masks(sana, pasted.inversion.cache, "a square", "a big red circle", 0.9, 2)
    grown = torch.nn.functional.max_pool2d(clean_masks, 3, stride=1, padding=1)  # paste_source's margin
    up = torch.nn.functional.interpolate(grown, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    outside, inside = (up == 0).numpy(), (up == 1).numpy()  # (T, H, W)
    assert outside.any() and inside.any()
    assert np.array_equal(pasted.frames[outside], pasted.source[outside])  # the source's own pixels
    assert not np.array_equal(plain.frames[outside], plain.source[outside])  # the decoded ones differ
    assert np.array_equal(pasted.frames[inside], plain.frames[inside])  # inside, the edit as decoded
