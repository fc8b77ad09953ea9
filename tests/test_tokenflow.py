"""TokenFlow on tiny random SD-UNet and SANA backbones: attention, propagation, inversion cache, editing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sanaflow.errors import ConfigError, InputError
from sanaflow.pipelines.video_edit import VideoEditPipeline
from sanaflow.tokenflow import (
    EditSettings,
    LatentCache,
    Pass,
    TokenFlowAttnProcessor,
    TokenFlowState,
    edit_latents,
    invert_latents,
    load_backbone,
    sample_plain,
    tokenflow_hooks,
)
from sanaflow.tokenflow.attention import blend_weights, latent_index
from sanaflow.tokenflow.backbones import SanaAttentionOps, SDAttentionOps, _sana_processor_class
from sanaflow.tokenflow.correspondence import FlowCorrespondence
from sanaflow.tokenflow.editor import _carry_output, anchors_of, chunks, keyframe_groups


def clip(t: int = 4, h: int = 16, w: int = 16, seed: int = 0) -> np.ndarray:
    """A textured square moving right over a smooth background."""
    rng = np.random.default_rng(seed)
    tex = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[..., 2] = np.linspace(30, 200, w, dtype=np.uint8)[None, None, :]
    for i in range(t):
        x = 1 + i % 9
        frames[i, 5:11, x : x + 6] = tex
    return frames


# one_thread, sd_folder (a tiny SD folder with a ControlNet) and the backbones sd / sana come from conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# Extended attention and propagation against direct implementations
# --------------------------------------------------------------------------------------------


def _heads(t, h):
    return t.unflatten(-1, (h, -1)).transpose(0, 1)  # (N, h*d) -> (h, N, d)


def _direct_softmax(qs, ks, vs):
    d = qs.shape[-1]
    return torch.softmax(qs @ ks.transpose(-1, -2) / d**0.5, dim=-1) @ vs


def _direct_linear(qs, ks, vs):
    q, k = torch.relu(qs), torch.relu(ks)
    # a query that ReLU zeroes gets 0 (the kernel's epsilon), not 0 / 0
    return (q @ (k.transpose(-1, -2) @ vs)) / (q @ k.sum(dim=-2, keepdim=True).transpose(-1, -2) + 1e-15)


def _direct_extended(attn, x, n, inject, kind):
    """Attention written out token by token: edit frame j attends to the tokens of all n frames of its branch."""
    h = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (3n, N, h*d)
    if inject:
        q = torch.cat([q[:n]] * 3)
        k = torch.cat([k[:n]] * 3)
    fn = _direct_softmax if kind == "softmax" else _direct_linear
    outs = []
    for b in range(3):
        for j in range(n):
            r = b * n + j
            if b == 0:  # source branch: per frame
                keys, values = _heads(k[r], h), _heads(v[r], h)
            else:  # concatenate the branch's frames along the token axis
                keys = torch.cat([_heads(k[b * n + f], h) for f in range(n)], dim=1)
                values = torch.cat([_heads(v[b * n + f], h) for f in range(n)], dim=1)
            o = fn(_heads(q[r], h), keys, values)  # (h, N, d)
            outs.append(attn.to_out[0](o.transpose(0, 1).flatten(1)))
    return torch.stack(outs)


@pytest.mark.parametrize("inject", [False, True])
@pytest.mark.parametrize("kind", ["softmax", "linear"])
def test_extended_attention_equals_direct(kind, inject):
    torch.manual_seed(0)
    n, tokens, dim = 3, 5, 16
    if kind == "softmax":
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        attn = Attention(query_dim=dim, heads=2, dim_head=8)
        proc_cls, ops, original = TokenFlowAttnProcessor, SDAttentionOps(), AttnProcessor2_0()
    else:
        from sanaflow.models.sana_transformer import LinearSelfAttnProcessor, SanaSelfAttention

        attn = SanaSelfAttention(dim, heads=2, head_dim=8, bias=False, qk_norm=None, dropout=0.0)
        proc_cls, ops, original = _sana_processor_class(), SanaAttentionOps(), LinearSelfAttnProcessor()
    state = TokenFlowState(mode=Pass.KEYFRAMES, frames=n, inject_attention=inject)
    proc = proc_cls("site", state, ops, original, pnp=True)
    x = torch.randn(3 * n, tokens, dim)
    with torch.no_grad():
        out = proc(attn, x, 1, tokens) if kind == "linear" else proc(attn, x)
        expected = _direct_extended(attn, x, n, inject, kind)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state.keyframe_inputs["site"], x[:n])
    torch.testing.assert_close(state.keyframe_outputs["site"], out.unflatten(0, (3, n)))
    # Plain mode hands over to the original processor.
    state.mode = Pass.PLAIN
    with torch.no_grad():
        plain = proc(attn, x, 1, tokens) if kind == "linear" else proc(attn, x)
        ref = original(attn, x, 1, tokens) if kind == "linear" else original(attn, x)
    torch.testing.assert_close(plain, ref)


@pytest.mark.parametrize("anchors", [[2, 1], [0]])
def test_propagation_equals_direct(anchors):
    torch.manual_seed(1)
    k_frames, n, tokens, dim = 3, 4, 6, 8
    state = TokenFlowState(mode=Pass.PROPAGATE, frames=n, anchors=anchors)
    state.keyframe_inputs["s"] = torch.randn(k_frames, tokens, dim)
    state.keyframe_outputs["s"] = torch.randn(3, k_frames, tokens, dim)
    parts = chunks(12, n)
    if len(anchors) == 2:
        state.weights = blend_weights(torch.arange(8, 12), 10, 6)
    proc = TokenFlowAttnProcessor("s", state, SDAttentionOps(), None, pnp=False)
    x = torch.randn(3 * n, tokens, dim)
    out = proc(None, x).unflatten(0, (3, n))  # attention module unused: nothing is computed

    expected = torch.zeros(3, n, tokens, dim)
    for f in range(n):
        gathered = []
        for a in anchors:
            keys = state.keyframe_inputs["s"][a]
            sims = torch.stack([torch.cosine_similarity(x[f, p][None], keys, dim=-1) for p in range(tokens)])
            best = sims.argmax(dim=-1)  # (N,)
            gathered.append(state.keyframe_outputs["s"][:, a, best])  # (3, N, D)
        if len(anchors) == 1:
            expected[:, f] = gathered[0]
        else:
            # TokenFlow's weight, distances to the chunk centres 10 (own chunk 8..11) and 6 (previous chunk)
            d1, d2 = abs(8 + f - 10), abs(8 + f - 6)
            w = 1 / (1 + np.exp(-d2 / (d1 + d2)))
            expected[:, f] = w * gathered[0] + (1 - w) * gathered[1]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    # the editor's anchors for chunk 2 of 3: its own keyframe slot, then the previous chunk's
    slots, weights = anchors_of(parts, 2)
    assert slots == [2, 1]
    torch.testing.assert_close(weights, state.weights if len(anchors) == 2 else blend_weights(torch.arange(8, 12), 10, 6))


@pytest.mark.parametrize("height,width,factor", [(4, 6, 1), (4, 6, 2), (6, 9, 3),
                                                  (9, 8, 2), (9, 7, 2), (5, 7, 4), (9, 14, 4), (3, 3, 2)])
def test_latent_index_equals_direct(height, width, factor):
    """A latent pixel goes to the same offset inside the token its own token is matched to.

    A UNet level of an odd latent side has ceil(side / f) tokens (the last four cases); there a matched
    position past the latent's edge (a cut-off token) takes the last row / column.
    """
    torch.manual_seed(3)
    gh, gw = -(-height // factor), -(-width // factor)
    token_index = torch.randint(gh * gw, (2, 3, gh * gw))
    out = latent_index(token_index, height, width)
    expected = torch.empty(2, 3, height * width, dtype=torch.long)
    for a in range(2):
        for f in range(3):
            for y in range(height):
                for x in range(width):
                    t = int(token_index[a, f, (y // factor) * gw + x // factor])
                    ty, tx = divmod(t, gw)
                    yy = min(ty * factor + y % factor, height - 1)
                    xx = min(tx * factor + x % factor, width - 1)
                    expected[a, f, y * width + x] = yy * width + xx
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="not a grid"):
        latent_index(torch.zeros(1, 1, 5, dtype=torch.long), height, width)


@pytest.mark.parametrize("masked", [False, True])
def test_output_propagation_equals_direct(masked):
    """Each frame's prediction moves towards its anchors' predictions at the matched latent pixels,
    weighted by the frame distance blend, by weight x mask."""
    torch.manual_seed(4)
    n, c, h, w, k = 3, 2, 4, 4, 3
    guided = torch.randn(n, c, h, w)
    keys = torch.randn(k, c, h, w)
    state = TokenFlowState(anchors=[2, 0], weights=torch.tensor([0.9, 0.6, 0.3]))
    state.token_index = torch.randint(4, (2, n, 4))  # a 2 x 2 token grid: factor 2
    mask = (torch.rand(n, 1, h, w) > 0.5).float() if masked else None
    out = _carry_output(guided, keys.flatten(2).transpose(1, 2), state, 0.6, mask)
    index = latent_index(state.token_index, h, w)
    expected = guided.clone()
    for f in range(n):
        for pix in range(h * w):
            y, x = divmod(pix, w)
            a0, a1 = (divmod(int(index[a, f, pix]), w) for a in range(2))
            carried = (state.weights[f] * keys[2, :, a0[0], a0[1]] + (1 - state.weights[f]) * keys[0, :, a1[0], a1[1]])
            m = 0.6 * (1.0 if mask is None else float(mask[f, 0, y, x]))
            expected[f, :, y, x] = (1 - m) * guided[f, :, y, x] + m * carried
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    state.token_index = None
    with pytest.raises(RuntimeError, match="recorded"):
        _carry_output(guided, keys.flatten(2).transpose(1, 2), state, 0.6, mask)


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("kind", ["softmax", "linear"])
def test_propagation_mix_equals_direct(kind, p):
    """Below 1, a propagated frame's output is p * (gathered keyframe tokens) + (1 - p) * its own attention."""
    torch.manual_seed(2)
    k_frames, n, tokens, dim = 2, 3, 5, 16
    if kind == "softmax":
        from diffusers.models.attention_processor import Attention

        attn = Attention(query_dim=dim, heads=2, dim_head=8)
        proc_cls, ops, fn = TokenFlowAttnProcessor, SDAttentionOps(), _direct_softmax
    else:
        from sanaflow.models.sana_transformer import SanaSelfAttention

        attn = SanaSelfAttention(dim, heads=2, head_dim=8, bias=False, qk_norm=None, dropout=0.0)
        proc_cls, ops, fn = _sana_processor_class(), SanaAttentionOps(), _direct_linear
    state = TokenFlowState(mode=Pass.PROPAGATE, frames=n, anchors=[0], inject_attention=True, propagation=p)
    state.keyframe_inputs["s"] = torch.randn(k_frames, tokens, dim)
    state.keyframe_outputs["s"] = torch.randn(3, k_frames, tokens, dim)
    proc = proc_cls("s", state, ops, None, pnp=True)
    x = torch.randn(3 * n, tokens, dim)
    with torch.no_grad():
        out = proc(attn, x, 1, tokens) if kind == "linear" else proc(attn, x)
        # own attention, per frame, with the source branch's queries and keys (PnP injection)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        own = []
        for r in range(3 * n):
            o = fn(_heads(q[r % n], attn.heads), _heads(k[r % n], attn.heads), _heads(v[r], attn.heads))
            own.append(attn.to_out[0](o.transpose(0, 1).flatten(1)))
        own = torch.stack(own)
    keys = state.keyframe_inputs["s"][0]
    gathered = torch.empty(3 * n, tokens, dim)
    for f in range(n):
        best = torch.stack([torch.cosine_similarity(x[f, t][None], keys, dim=-1) for t in range(tokens)]).argmax(-1)
        for b in range(3):
            gathered[b * n + f] = state.keyframe_outputs["s"][b, 0, best]
    torch.testing.assert_close(out, p * gathered + (1 - p) * own, atol=1e-5, rtol=1e-4)


def test_flow_correspondence_follows_translation():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    import cv2

    base = cv2.GaussianBlur(base, (5, 5), 1.5)
    frames = np.stack([base, np.roll(base, 4, axis=1)])  # frame 1 = frame 0 moved 4 px right
    flow = FlowCorrespondence(frames)
    index = flow.token_index(0, 1, tokens=16 * 24).view(16, 24)  # token grid at 1/4 scale: 1 token right
    interior = index[3:-3, 3:-3]
    cols = torch.arange(24).view(1, 24).expand(16, 24)[3:-3, 3:-3]
    rows = torch.arange(16).view(16, 1).expand(16, 24)[3:-3, 3:-3]
    assert ((interior == rows * 24 + cols + 1).float().mean()) > 0.8
    assert torch.equal(flow.token_index(1, 1, 16 * 24), torch.arange(16 * 24))


# --------------------------------------------------------------------------------------------
# Scheduler, hooks, inversion cache
# --------------------------------------------------------------------------------------------


def test_ddim_move_matches_diffusers(sd):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler.from_config(sd.scheduler.config)
    ref.set_timesteps(4)
    times = sd.timesteps(4)
    assert times == [int(t) for t in ref.timesteps]
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for i, t in enumerate(times):
        nxt = times[i + 1] if i + 1 < len(times) else None
        torch.testing.assert_close(sd.move(x, eps, t, nxt), ref.step(eps, t, x).prev_sample, atol=1e-5, rtol=1e-5)


def test_hooks_restore_processors(sd, sana):
    for backbone in (sd, sana):
        before = backbone.self_attention_processors()
        with tokenflow_hooks(backbone, TokenFlowState()):
            inside = backbone.self_attention_processors()
            assert all(isinstance(p, TokenFlowAttnProcessor) for p in inside.values())
        after = backbone.self_attention_processors()
        assert all(after[k] is before[k] for k in before)
    assert sd.pnp_attention_sites() == ["up_blocks.0.attentions.1.transformer_blocks.0.attn1"]
    assert sana.pnp_attention_sites() == ["transformer_blocks.1.attn1"]


@pytest.mark.parametrize("which", ["sd", "sana"])
def test_feature_injection_reaches_the_residual_branch(which, sd, sana):
    """With PnP feature injection on, the edit branches' residual features are the source branch's."""
    backbone = sd if which == "sd" else sana
    if which == "sd":
        model, t, probe = sd.unet, 500, sd.FEATURE_SITE
    else:
        model, t, probe = sana.transformer, 0.5, sana.feature_site
    n = 2
    x = torch.randn(3 * n, 4, 8, 8)  # branches differ
    cond = backbone.embed(["a square", "", "a red square"]).take([0] * n + [1] * n + [2] * n)
    seen = []
    for inject in (False, True):
        state = TokenFlowState(mode=Pass.PER_FRAME, frames=n, inject_features=inject)
        with tokenflow_hooks(backbone, state):
            # Registered after the injection hook on the same module, so it sees the injected output.
            handle = model.get_submodule(probe).register_forward_hook(lambda m, i, out: seen.append(out.clone()))
            try:
                backbone.denoise(x, t, cond)
            finally:
                handle.remove()
    plain, injected = seen  # one call of the probed module per denoiser call
    assert not torch.allclose(plain[n:2 * n], plain[:n])
    torch.testing.assert_close(injected[n:2 * n], injected[:n])
    torch.testing.assert_close(injected[2 * n :], injected[:n])
    torch.testing.assert_close(injected[:n], plain[:n])  # the source branch itself is untouched


def test_cache_round_trip_and_reuse(sd, tmp_path):
    pipe = VideoEditPipeline(sd, cache_dir=tmp_path)
    source = pipe.prepare(clip(t=3))
    first = pipe.invert(source, "a square", steps=3, batch_size=2, progress=False)
    assert not first.reused and (first.cache.folder / "manifest.json").is_file()
    again = pipe.invert(source, "a square", steps=3, batch_size=2, progress=False)
    assert again.reused and again.cache.folder == first.cache.folder
    for i in range(3):
        assert torch.equal(again.cache.latents(i), first.cache.latents(i))
        assert again.cache.latents(i).shape == (3, 4, 8, 8)
    assert not torch.equal(first.cache.latents(0), first.cache.clean())
    reloaded = LatentCache(first.cache.folder)
    assert reloaded.timesteps == sd.timesteps(3)
    rec = pipe.invert(source, "a square", steps=3, batch_size=2, reconstruct=True, progress=False)
    assert rec.reconstruction.shape == (3, 16, 16, 3) and rec.cache.reconstruction_path.is_file()
    rec2 = pipe.invert(source, "a square", steps=3, batch_size=2, reconstruct=True, progress=False)
    np.testing.assert_array_equal(rec2.reconstruction, rec.reconstruction)  # kept in the cache
    other = pipe.invert(source, "a circle", steps=3, batch_size=2, progress=False)
    assert not other.reused and other.cache.folder != first.cache.folder
    # batching over frames does not change the inversion (unrefined: the tiny random UNet's 3-step
    # fixed-point iterations amplify float rounding of a different batch far beyond 1e-5)
    one, two = (VideoEditPipeline(sd, cache_dir=tmp_path / f"b{b}").invert(
        source, "a square", steps=3, batch_size=b, progress=False, inversion_refine=0) for b in (1, 2))
    torch.testing.assert_close(one.cache.latents(0), two.cache.latents(0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="holds 3 steps"):
        edit_latents(sd, first.cache, EditSettings("x", steps=4))


def test_reconstruction_without_pyav_keeps_the_lossless_frames(sd, tmp_path, monkeypatch):
    """Without PyAV (the video extra) the watch-mp4 is skipped; the reusable frames are still kept."""
    import sanaflow.video

    monkeypatch.setattr(sanaflow.video, "has_pyav", lambda: False)
    pipe = VideoEditPipeline(sd, cache_dir=tmp_path)
    source = pipe.prepare(clip(t=2))
    rec = pipe.invert(source, "a square", steps=2, batch_size=2, reconstruct=True, progress=False)
    assert rec.reconstruction.shape == (2, 16, 16, 3) and not rec.cache.reconstruction_path.exists()
    np.testing.assert_array_equal(rec.cache.reconstruction(), rec.reconstruction)


@pytest.mark.parametrize("which", ["sd", "sana"])
def test_refined_inversion_is_retraced_by_the_sampler(which, sd, sana, tmp_path):
    """Fixed-point refinement makes the sampler's steps carry the inverted latent back to the source."""
    backbone = sd if which == "sd" else sana
    clean = torch.randn(2, 4, 8, 8)
    cond = backbone.embed(["a square"])
    steps = 12
    errors = {}
    for refine in (0, 8):
        latents = invert_latents(backbone, clean, cond, steps, steps, 2, refine=refine)
        back = sample_plain(backbone, latents["step_0000"], cond, backbone.timesteps(steps), 2)
        errors[refine] = (back - clean).abs().mean().item()
    # Random tiny weights are far rougher than a trained model's (a few steps only settle into a
    # small cycle), hence the loose factor; plain inversion drifts by the order of the latents.
    assert errors[0] > 0.1 and errors[8] < 0.25 * errors[0], errors
    # the refinement is part of the cache key: a refined inversion is not served for a plain one
    pipe = VideoEditPipeline(backbone, cache_dir=tmp_path)
    source = pipe.prepare(clip(t=2))
    plain = pipe.invert(source, "a square", steps=2, progress=False, inversion_refine=0)
    refined = pipe.invert(source, "a square", steps=2, progress=False, inversion_refine=2)
    assert not refined.reused and refined.cache.folder != plain.cache.folder
    assert pipe.invert(source, "a square", steps=2, progress=False, inversion_refine=2).reused


# --------------------------------------------------------------------------------------------
# Editing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["sd", "sana"])
def test_single_frame_without_injection_equals_plain_sampling(which, sd, sana, tmp_path):
    backbone = sd if which == "sd" else sana
    pipe = VideoEditPipeline(backbone, cache_dir=tmp_path)
    source = pipe.prepare(clip(t=1))
    inv = pipe.invert(source, "a square", steps=3, progress=False)
    # Both thresholds at 0 also turn the default cross-attention control off; SANA's default local
    # blend is not an injection but keeps the source outside its mask, so it is switched off here.
    settings = EditSettings("a red square", source_prompt="a square", steps=3, pnp_feature=0.0, pnp_attention=0.0,
                            local_blend=0.0)
    edited = edit_latents(backbone, inv.cache, settings, source.frames)  # SANA: output propagation on
    conds = backbone.embed([settings.negative_prompt, settings.prompt])
    plain = sample_plain(backbone, inv.cache.latents(0), conds.take([1]), inv.cache.timesteps, 8,
                         uncond=conds.take([0]), guidance_scale=settings.guidance_scale)
    torch.testing.assert_close(edited, plain, atol=1e-4, rtol=1e-4)
    # with injection on, the edit differs (the hooks do something)
    injected = edit_latents(backbone, inv.cache, EditSettings("a red square", source_prompt="a square", steps=3),
                            source.frames)
    assert (injected - plain).abs().max() > 1e-3


@pytest.mark.parametrize("which", ["sd", "sana"])
def test_propagation_weight_spans_tokenflow_to_per_frame(which, sd, sana, tmp_path):
    """propagation=0 is the per-frame edit; 1 (SD's default) is pure propagation; SANA defaults to a mix;
    outside [0, 1] is refused."""
    backbone = sd if which == "sd" else sana
    pipe = VideoEditPipeline(backbone, cache_dir=tmp_path)
    inv = pipe.invert(pipe.prepare(clip(t=5)), "a square", steps=3, progress=False)

    def run(**kw):
        # the token propagation alone: SANA's output propagation off
        settings = EditSettings("a red square", source_prompt="a square", steps=3, batch_size=2,
                                output_propagation=0.0, **kw)
        return edit_latents(backbone, inv.cache, settings)

    per_frame = run(mode="per-frame")
    torch.testing.assert_close(run(propagation=0.0), per_frame, atol=1e-5, rtol=1e-5)
    pure = run(propagation=1.0)
    half = run(propagation=0.5)
    assert (pure - per_frame).abs().max() > 1e-3 and (half - pure).abs().max() > 1e-4
    assert (half - per_frame).abs().max() > 1e-4
    if which == "sd":
        torch.testing.assert_close(run(), pure)  # TokenFlow's pure propagation is SD's default
    else:  # SANA's default is the validated mix (SANA_PROPAGATION)
        assert 0.0 < backbone.default_propagation < 1.0
        torch.testing.assert_close(run(), run(propagation=backbone.default_propagation))
        assert (run() - pure).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="--propagation"):
        run(propagation=1.5)


@pytest.mark.parametrize("corr", ["flow", "tokens"])
@pytest.mark.parametrize("which", ["sd", "sana"])
def test_output_propagation(which, corr, sd, sana, tmp_path):
    """Off by default on SD; a single frame is its own keyframe, so carrying the keyframes' predictions
    changes nothing there; on several frames it changes the edit; the per-frame mode ignores it."""
    backbone = sd if which == "sd" else sana
    pipe = VideoEditPipeline(backbone, cache_dir=tmp_path)

    def run(video, **kw):
        clip_, inv = video
        settings = EditSettings("a red square", source_prompt="a square", steps=3, batch_size=2,
                                output_correspondence=corr, **kw)
        return edit_latents(backbone, inv.cache, settings, clip_.frames)

    def invert(t):
        clip_ = pipe.prepare(clip(t=t))
        return clip_, pipe.invert(clip_, "a square", steps=3, progress=False)

    one = invert(1)
    torch.testing.assert_close(run(one, output_propagation=1.0), run(one, output_propagation=0.0),
                               atol=1e-5, rtol=1e-5)
    five = invert(5)
    off = run(five, output_propagation=0.0)
    full = run(five, output_propagation=1.0, output_propagation_steps=1.0)
    assert (full - off).abs().max() > 1e-4
    # only the leading steps: between the two
    first = run(five, output_propagation=1.0, output_propagation_steps=0.34)
    assert (first - off).abs().max() > 1e-5 and (first - full).abs().max() > 1e-5
    torch.testing.assert_close(run(five, output_propagation=1.0, output_propagation_steps=0.0), off)
    if which == "sd":
        torch.testing.assert_close(run(five), off)  # TokenFlow's behaviour: off
    else:  # SANA's validated default: on, in the leading steps
        assert backbone.default_output_propagation > 0 and 0 < backbone.default_output_propagation_steps < 1
        assert (run(five) - off).abs().max() > 1e-5
        # without the source frames the default carries along the token matches; asking for flow is an error
        bare = EditSettings("a red square", source_prompt="a square", steps=3, batch_size=2)
        tokens = EditSettings(**{**bare.__dict__, "output_correspondence": "tokens"})
        torch.testing.assert_close(edit_latents(backbone, five[1].cache, bare),
                                   edit_latents(backbone, five[1].cache, tokens, five[0].frames))
        with pytest.raises(InputError, match="source frames"):
            edit_latents(backbone, five[1].cache, EditSettings("a red square", steps=3, output_correspondence="flow"))
    torch.testing.assert_close(run(five, mode="per-frame", output_propagation=1.0), run(five, mode="per-frame"))
    with pytest.raises(ConfigError, match="--output-propagation"):
        run(five, output_propagation=-0.1)
    with pytest.raises(ConfigError, match="output_correspondence"):
        edit_latents(backbone, five[1].cache, EditSettings("a red square", steps=3, output_correspondence="x"))


def test_flow_sample_grid_follows_translation():
    """The sampling grid of frame 0, whose content is frame 1's moved 6 px left, samples frame 1 6 px right."""
    import cv2

    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8), (5, 5), 1.5)
    frames = np.stack([base, np.roll(base, 6, axis=1)])  # frame 1 = frame 0 moved 6 px right
    corr = FlowCorrespondence(frames)
    grid = corr.sample_grid(0, 1, 16, 24)  # latent grid at 1/4 scale: 1.5 latent pixels right
    ident_x = ((torch.arange(24) + 0.5) / 24 * 2 - 1).view(1, 24).expand(16, 24)
    ident_y = ((torch.arange(16) + 0.5) / 16 * 2 - 1).view(16, 1).expand(16, 24)
    shift = (grid[..., 0] - ident_x) * 24 / 2  # in latent pixels
    assert (shift[3:-3, 3:-3] - 1.5).abs().median() < 0.2
    assert (grid[3:-3, 3:-3, 1] - ident_y[3:-3, 3:-3]).abs().median() * 16 / 2 < 0.2
    torch.testing.assert_close(corr.sample_grid(1, 1, 16, 24), torch.stack([ident_x, ident_y], -1))


def test_modes_run_and_keep_shape(sd, tmp_path):
    pipe = VideoEditPipeline(sd, cache_dir=tmp_path)
    frames = clip(t=5)
    outs = {}
    for mode, corr in [("tokenflow-pnp", "features"), ("tokenflow-pnp", "flow"), ("per-frame", "features"),
                       ("tokenflow-sdedit", "features")]:
        out = pipe(frames, "a red square", mode=mode, correspondence=corr, steps=2, batch_size=2, progress=False)
        assert out.frames.shape == (5, 16, 16, 3) and out.frames.dtype == np.uint8
        outs[(mode, corr)] = out.frames
    assert not np.array_equal(outs[("tokenflow-pnp", "features")], outs[("per-frame", "features")])
    offloaded = pipe(frames, "a red square", steps=2, batch_size=2, offload_keyframes=True, progress=False)
    np.testing.assert_array_equal(offloaded.frames, outs[("tokenflow-pnp", "features")])
    # keyframes in groups of one: no joint attention, but the stored tokens line up with the chunks
    grouped = pipe(frames, "a red square", steps=2, batch_size=2, max_keyframes=1, progress=False)
    assert grouped.frames.shape == (5, 16, 16, 3)
    assert not np.array_equal(grouped.frames, outs[("tokenflow-pnp", "features")])
    assert keyframe_groups(25, 24) == [range(0, 12), range(12, 25)]
    assert keyframe_groups(5, None) == [range(5)]
    with pytest.raises(ConfigError, match="unknown mode"):
        pipe(frames, "x", mode="tokenflow", steps=2, progress=False)


def test_sana_edit_multi_chunk(sana, tmp_path):
    pipe = VideoEditPipeline(sana, cache_dir=tmp_path)
    frames = clip(t=5)
    tf = pipe(frames, "a red square", steps=2, batch_size=2, progress=False)
    flow = pipe(frames, "a red square", steps=2, batch_size=2, correspondence="flow", progress=False)
    per_frame = pipe(frames, "a red square", steps=2, batch_size=2, mode="per-frame", progress=False)
    assert tf.frames.shape == flow.frames.shape == per_frame.frames.shape == (5, 16, 16, 3)
    assert tf.inversion.reused is False and flow.inversion.reused is True
    assert not np.array_equal(tf.frames, per_frame.frames)


def test_controlnet_at_zero_scale_changes_nothing(sd_folder, tmp_path):
    backbone = load_backbone(sd_folder, controlnet=sd_folder / "controlnet")
    pipe = VideoEditPipeline(backbone, cache_dir=tmp_path)
    frames = clip(t=2)
    kw = dict(steps=2, batch_size=2, progress=False)
    plain = pipe(frames, "a red square", **kw).frames
    zero = pipe(frames, "a red square", control_scale=0.0, **kw).frames
    one = pipe(frames, "a red square", control_scale=1.0, **kw)
    np.testing.assert_array_equal(plain, zero)
    assert one.frames.shape == plain.shape
    assert not np.array_equal(one.frames, plain)
    # The ControlNet residuals reach only the weighted rows: equal to running it on those rows alone.
    x, t = torch.randn(3, 4, 8, 8), backbone.timesteps(2)[0]
    cond = backbone.embed(["a", "b", "c"])
    edges = backbone.control_images(frames[[0, 1, 1]])
    both = backbone.denoise(x, t, cond, edges, torch.tensor([0.0, 1.0, 0.5]))
    alone = backbone.denoise(x[1:2], t, cond.take([1]), edges[1:2], torch.tensor([1.0]))
    torch.testing.assert_close(both[1:2], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[0:1], backbone.denoise(x[:1], t, cond.take([0])), atol=1e-5, rtol=1e-4)


def test_model_batches_do_not_grow_with_video_length(sd, tmp_path):
    """Every model call sees at most 3 x max(batch_size, max_keyframes) frames, however long the video."""
    sizes = []
    handle = sd.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        pipe = VideoEditPipeline(sd, cache_dir=tmp_path)
        for t in (4, 12):
            sizes.clear()
            out = pipe(clip(t=t), "a red square", steps=2, batch_size=2, max_keyframes=2, progress=False)
            assert out.frames.shape[0] == t
            assert max(sizes) == 6, sizes  # 3 branches x 2 frames (inversion batches are 2 frames)
    finally:
        handle.remove()


@pytest.mark.gpu
@pytest.mark.parametrize("offload", [False, True])
def test_edit_on_cuda_matches_shapes_and_devices(sd_folder, tmp_path, offload):
    backbone = load_backbone(sd_folder, device="cuda", dtype=torch.float16, controlnet=sd_folder / "controlnet")
    pipe = VideoEditPipeline(backbone, cache_dir=tmp_path)
    for corr in ("features", "flow"):
        out = pipe(clip(t=5), "a red square", steps=2, batch_size=2, correspondence=corr, control_scale=0.5,
                   offload_keyframes=offload, progress=False)
        assert out.frames.shape == (5, 16, 16, 3)


def test_settings_are_checked_without_a_model():
    from sanaflow.pipelines.video_edit import VideoEditPipeline

    s = VideoEditPipeline.settings("a red square", steps=3, batch_size=2, negative_prompt=None)
    assert (s.steps, s.batch_size, s.negative_prompt) == (3, 2, EditSettings("x").negative_prompt)
    assert VideoEditPipeline.settings("x", guidance_scale=2.0).guidance_scale == 2.0
    with pytest.raises(InputError, match="unknown edit setting.*bogus"):
        VideoEditPipeline.settings("x", bogus=1)
    with pytest.raises(InputError, match="non-empty --prompt"):
        VideoEditPipeline.settings("  ")
    with pytest.raises(ConfigError, match="--cfg"):
        VideoEditPipeline.settings("x", guidance_scale=float("nan"))


def test_pipeline_takes_a_list_of_frames_and_checks_fps_and_input_type_first(sd, tmp_path, monkeypatch):
    import sanaflow.pipelines.video_edit as ve

    pipe = VideoEditPipeline(sd, cache_dir=tmp_path)
    frames = clip(t=3)
    as_array = pipe(frames, "a red square", steps=2, batch_size=2, progress=False)
    as_list = pipe(list(frames), "a red square", steps=2, batch_size=2, progress=False, fps=12)
    np.testing.assert_array_equal(as_list.frames, as_array.frames)
    assert as_list.fps == 12 and as_array.fps == 24
    assert pipe.prepare(list(frames), start=1).num_frames == 2

    def no_work(*a, **k):
        raise AssertionError("the frames were encoded before the input was checked")

    monkeypatch.setattr(ve, "encode_frames", no_work)
    for bad, match in ((0, "fps must be a finite number above 0"), (float("nan"), "fps must be")):
        with pytest.raises(InputError, match=match):
            pipe(frames, "x", steps=2, progress=False, fps=bad)
    with pytest.raises(InputError, match="a list of"):
        pipe({"frames": frames}, "x", steps=2, progress=False)
    with pytest.raises(InputError, match="differ in size"):
        pipe([frames[0], frames[1, :8]], "x", steps=2, progress=False)
    with pytest.raises(InputError, match=r"frame 1 of the list must be an \(H, W, 3\) uint8"):
        pipe([frames[0], frames[1].astype(np.float32)], "x", steps=2, progress=False)
    with pytest.raises(InputError, match="empty"):
        pipe([], "x", steps=2, progress=False)


def test_unwritable_cache_fails_before_the_inversion_with_an_input_error(sd, tmp_path, monkeypatch):
    import sanaflow.pipelines.video_edit as ve
    from sanaflow.tokenflow.inversion import InversionKey

    blocker = tmp_path / "file"
    blocker.write_text("x")
    key = InversionKey("v", "m", 16, 16, 1, 1, 1, "")
    with pytest.raises(InputError, match="cannot write the inversion cache"):
        LatentCache.write(blocker, key, [1.0], {"clean": torch.zeros(1, 4, 2, 2)})
    monkeypatch.setattr(ve, "invert_latents", lambda *a, **k: pytest.fail("inverted before the cache was checked"))
    pipe = VideoEditPipeline(sd, cache_dir=blocker / "cache")
    with pytest.raises(InputError, match="is a file, not a folder"):
        pipe.invert(pipe.prepare(clip(t=1)), steps=1, progress=False)


def test_frame_multiple_from_configs_matches_the_loaded_backbone(sd_folder, sd, tmp_path):
    from sanaflow.tokenflow.backbones import frame_multiple
    from tiny_sana import save_tiny_sana

    assert frame_multiple(sd_folder) == sd.multiple
    sana_folder = save_tiny_sana(tmp_path / "sana")
    assert frame_multiple(sana_folder) == load_backbone(sana_folder).multiple
    assert frame_multiple(None) == 32  # the embedded SANA model: DC-AE f32, patch 1
