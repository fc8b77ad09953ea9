"""TokenFlow on a spread of tiny random configs the other tests do not build.

Stable Diffusion UNets in SD-1.5 style (integer head count, convolutional projections) and SD-2 style
(linear projections, per-block head counts, upcast attention, v-prediction), 2 or 3 levels, 1 or 2
layers per block, 2 transformer layers per attention, other cross-attention widths, VAEs of factor 2
and 4, non-square and odd latent grids; SANA transformers with 1 to 4 self-attention heads of other
widths, other cross-attention heads, 1 to 4 layers, patch size 1 and 2, qk-norm, sin-cos positions,
attention biases, non-square latents. On each:

- (a, b) one hooked denoiser call in the keyframe pass (extended attention, PnP q/k and feature
  injection on and off) and then in the propagation pass (one or two anchors, pure and mixed
  propagation) equals the same call with *direct* processors written out here per frame and token;
- (a, b) a whole `edit_latents` run (odd frame counts, chunks of 2 or 3, a chunk larger than the
  video, keyframes in groups, seeds, guidance) equals a direct TokenFlow loop over the same
  keyframes built from those processors and the backbone's `denoise` / `move`;
- (c) a single frame with both PnP thresholds 0 edits to plain sampling;
- (d) the inversion cache round-trips (and an edit from the reloaded cache is the same);
- output propagation along token matches works where a UNet level rounds an odd latent side up.
"""

from __future__ import annotations

import collections
import contextlib
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sanaflow.models.sana_transformer import SelfAttnProcessor
from sanaflow.ops.linear_attention import NORMALISER_EPS
from sanaflow.pipelines.video_edit import VideoEditPipeline
from sanaflow.tokenflow import (
    EditSettings,
    LatentCache,
    Pass,
    SanaBackbone,
    StableDiffusionBackbone,
    TokenFlowState,
    edit_latents,
    sample_plain,
    tokenflow_hooks,
)
from sanaflow.tokenflow import editor as editor_module
from sanaflow.tokenflow.inversion import InversionKey, encode_frames, step_key

# one_thread and the tiny SANA backbone `sana` (its DC-AE and text encoder are reused) come from conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")

SOURCE, TARGET, NEGATIVE = "a square", "a red square", "blurry"

# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"

# name -> UNet kwargs, VAE levels, scheduler prediction type, frame size (H, W)
SD_CONFIGS = {
    # SD-1.5 style: attention_head_dim an int (diffusers reads it as the head count), conv projections,
    # attention from the first level (the finest self-attention grid is the latent grid); 8 x 12 latents.
    "sd15": dict(
        unet=dict(down_block_types=(CA_DOWN, CA_DOWN, DOWN), up_block_types=(UP, CA_UP, CA_UP),
                  block_out_channels=(8, 16, 16), layers_per_block=1, attention_head_dim=2,
                  cross_attention_dim=24),
        vae_levels=2, prediction="epsilon", size=(16, 24)),
    # SD-2 style: linear projections, a head count per block, upcast attention, v-prediction, 2 layers
    # per block; 10 x 8 latents, so the lower levels are 5 x 4 and 3 x 2 (odd: rounded up).
    "sd2": dict(
        unet=dict(down_block_types=(CA_DOWN, CA_DOWN, DOWN), up_block_types=(UP, CA_UP, CA_UP),
                  block_out_channels=(16, 16, 32), layers_per_block=2, attention_head_dim=(2, 4, 4),
                  use_linear_projection=True, upcast_attention=True, cross_attention_dim=32),
        vae_levels=2, prediction="v_prediction", size=(20, 16)),
    # two levels, two transformer layers per attention, 8 heads of width 2, a factor-4 VAE; 6 x 8 latents.
    "sd-2level": dict(
        unet=dict(down_block_types=(CA_DOWN, DOWN), up_block_types=(UP, CA_UP), block_out_channels=(16, 16),
                  layers_per_block=1, attention_head_dim=8, transformer_layers_per_block=2,
                  cross_attention_dim=16),
        vae_levels=3, prediction="epsilon", size=(24, 32)),
}

# name -> SanaTransformer kwargs, frame size (H, W); the tiny DC-AE compresses 4x, so latents are H/4 x W/4.
SANA_CONFIGS = {
    "sana-h3-l3": dict(
        model=dict(num_attention_heads=3, attention_head_dim=4, num_layers=3, num_cross_attention_heads=2,
                   cross_attention_head_dim=6, mlp_ratio=2.0, patch_size=1),
        size=(16, 24)),
    "sana-h4-l1-p2-qknorm": dict(
        model=dict(num_attention_heads=4, attention_head_dim=4, num_layers=1, num_cross_attention_heads=4,
                   cross_attention_head_dim=4, mlp_ratio=2.5, patch_size=2, qk_norm="rms_norm_across_heads",
                   interpolation_scale=1),
        size=(24, 32)),
    "sana-h1-l4-p2-bias": dict(
        model=dict(num_attention_heads=1, attention_head_dim=16, num_layers=4, num_cross_attention_heads=1,
                   cross_attention_head_dim=16, mlp_ratio=1.5, patch_size=2, attention_bias=True),
        size=(32, 16)),
}
CONFIGS = [*SD_CONFIGS, *SANA_CONFIGS]
# Not in CONFIGS (one test only): self-attention from the second level on, as in the other tests' tiny SD,
# so the finest self-attention grid is the latent grid halved (rounded up for odd sides).
SD_CONFIGS["sd-late-attention"] = dict(
    unet=dict(down_block_types=(DOWN, CA_DOWN), up_block_types=(CA_UP, UP), block_out_channels=(16, 16),
              layers_per_block=1, attention_head_dim=4, cross_attention_dim=16),
    vae_levels=2, prediction="epsilon", size=(18, 14))


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _sd_backbone(name: str, seed: int, tokenizer_dir) -> StableDiffusionBackbone:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = SD_CONFIGS[name]
    cross = cfg["unet"]["cross_attention_dim"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=8,
                                **cfg["unet"])
    levels = cfg["vae_levels"]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * (levels - 1) + (16,),
        latent_channels=4, norm_num_groups=8, layers_per_block=1,
    )
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=cross, intermediate_size=2 * cross, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=516, max_position_embeddings=16, projection_dim=cross, bos_token_id=514, eos_token_id=515,
    ))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          prediction_type=cfg["prediction"])
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    return StableDiffusionBackbone(unet, vae, text, CLIPTokenizer.from_pretrained(tokenizer_dir), sched,
                                   name=f"{name}-seed{seed}")


def _sana_backbone(name: str, seed: int, base: SanaBackbone) -> SanaBackbone:
    from sanaflow.models import SanaTransformer

    kw = dict(SANA_CONFIGS[name]["model"])
    dim = kw["num_attention_heads"] * kw["attention_head_dim"]
    transformer = SanaTransformer(in_channels=4, out_channels=4, cross_attention_dim=dim, caption_channels=16,
                                  sample_size=8, **kw)
    _randomize(transformer, seed)
    transformer.eval().requires_grad_(False)
    # the base's DC-AE (4x, 4 channels) and Gemma-2 text encoder (16 wide) with this transformer
    return SanaBackbone(transformer, base.vae, base.text_encoder, base.scheduler_config,
                        name=f"{name}-seed{seed}")


@pytest.fixture(scope="module")
def make(tmp_path_factory, sana):
    """make(name, seed=0) -> the tiny backbone of config `name` (built once per module)."""
    from tokenflow_tiny import write_tiny_tokenizer

    tokenizer_dir = tmp_path_factory.mktemp("clip-tokenizer")
    write_tiny_tokenizer(tokenizer_dir)

    @functools.cache
    def build(name: str, seed: int = 0):
        if name in SD_CONFIGS:
            return _sd_backbone(name, seed, tokenizer_dir)
        return _sana_backbone(name, seed, sana)

    return build


def frame_size(name: str) -> tuple[int, int]:
    return (SD_CONFIGS.get(name) or SANA_CONFIGS[name])["size"]


def video(t: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A textured square moving over a textured, smoothly shaded background (no flat regions)."""
    h, w = size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 120, (h, w, 3)).astype(np.float32)
    base[..., 2] += np.linspace(0, 120, w, dtype=np.float32)[None, :]
    tex = rng.integers(120, 255, (h // 2, w // 3, 3))
    frames = np.repeat(base[None], t, axis=0)
    for i in range(t):
        y, x = (i % 3), (2 * i) % max(1, w - w // 3)
        frames[i, y : y + h // 2, x : x + w // 3] = tex
    return frames.clip(0, 255).astype(np.uint8)


def latent_grid(backbone, size: tuple[int, int]) -> tuple[int, int]:
    """The latent (h, w) of frames of `size`."""
    f = backbone.multiple
    if isinstance(backbone, SanaBackbone):
        f //= backbone.transformer.config.patch_size
    return size[0] // f, size[1] // f


def time_of(backbone) -> float:
    """A mid-schedule model time of the backbone."""
    return backbone.timesteps(4)[1]


# --------------------------------------------------------------------------------------------
# Direct processors: attention written out per frame and token from the modules' projections
# --------------------------------------------------------------------------------------------


# Cosine similarities within this of the best count as ties. Tiny random SANA models give token features
# dominated by one shared vector (cosines of 0.97-0.99 between tokens), so two keyframe tokens can be equally
# near a token up to float rounding, and two correct implementations may pick either; the direct processors
# then check that the hooks' pick is a nearest neighbour up to TIE and follow it, so both runs stay in step.
TIE = 1e-5


class Direct:
    """The reference's own per-call state (read by every direct processor and the feature hook)."""

    def __init__(self, pnp_sites, picks: list[torch.Tensor] | None = None):
        self.pnp_sites = set(pnp_sites)
        self.mode = Pass.PLAIN
        self.frames = 0
        self.inject_attention = self.inject_features = False
        self.anchors: list[int] = []
        self.weights: torch.Tensor | None = None
        self.propagation = 1.0
        self.inputs: dict[str, list[torch.Tensor]] = {}  # site -> keyframe inputs (N, D), in order
        self.outputs: dict[str, list[torch.Tensor]] = {}  # site -> keyframe outputs (3, N, D), in order
        # the hooks' nearest neighbours (A, n, N), one per propagating site call, in call order (see TIE)
        self.picks = collections.deque(picks or [])
        self.matched = 0  # tokens matched to a keyframe token
        self.ties = 0  # ... of which took a tied pick other than this reference's own argmax

    def clear(self):
        self.inputs.clear()
        self.outputs.clear()


def record_picks(monkeypatch) -> list[torch.Tensor]:
    """The list every nearest-neighbour index (A, n, N) the TokenFlow hooks compute goes to, in call order."""
    from sanaflow.tokenflow import attention

    picks, nearest = [], attention.nearest_tokens
    monkeypatch.setattr(attention, "nearest_tokens", lambda q, k: picks.append(nearest(q, k)) or picks[-1])
    return picks


def _split(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(0, 1)  # (N, h*d) -> (h, N, d)


def _sd_qkv(attn, x):
    assert attn.norm_q is None and attn.norm_k is None
    assert attn.group_norm is None and attn.spatial_norm is None
    assert not attn.residual_connection and attn.rescale_output_factor == 1.0
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)  # (B, N, inner)


def _sd_attend(attn, q, k, v):
    """q (N, inner) over k, v (M, inner) -> (N, D): softmax(q k^T * scale) v per head, then to_out."""
    h = attn.heads
    p = torch.softmax(_split(q, h) @ _split(k, h).transpose(-1, -2) * attn.scale, dim=-1)  # (h, N, M)
    o = (p @ _split(v, h)).transpose(0, 1).flatten(1)  # (N, inner)
    return attn.to_out[1](attn.to_out[0](o))


def _sana_qkv(attn, x):
    return attn.norm_q(attn.to_q(x)), attn.norm_k(attn.to_k(x)), attn.to_v(x)  # (B, N, inner)


def _sana_attend(attn, q, k, v):
    """ReLU linear attention of q (N, inner) over k, v (M, inner), then to_out."""
    h = attn.heads
    q, k, v = torch.relu(_split(q, h)), torch.relu(_split(k, h)), _split(v, h)  # (h, N|M, d)
    num = q @ (k.transpose(-1, -2) @ v)  # (h, N, d)
    den = q @ k.sum(dim=1, keepdim=True).transpose(-1, -2)  # (h, N, 1)
    o = (num / (den + NORMALISER_EPS)).transpose(0, 1).flatten(1)  # (N, inner)
    return attn.to_out[1](attn.to_out[0](o))


class DirectProcessor:
    """Self-attention of one site from its definition: per frame, over all keyframes, or propagated."""

    def __init__(self, site: str, ref: Direct, kind: str):
        self.site, self.ref = site, ref
        self.qkv, self.attend = (_sd_qkv, _sd_attend) if kind == "sd" else (_sana_qkv, _sana_attend)

    def __call__(self, attn, hidden_states, *args, **kwargs):
        ref, x = self.ref, hidden_states
        n = ref.frames
        assert ref.mode is not Pass.PLAIN and x.shape[0] == 3 * n
        q, k, v = self.qkv(attn, x)
        if ref.inject_attention and self.site in ref.pnp_sites:  # edit branches take the source's q and k
            q = torch.cat([q[:n]] * 3)
            k = torch.cat([k[:n]] * 3)

        def own(r):  # row r attends to its own frame's tokens
            return self.attend(attn, q[r], k[r], v[r])

        if ref.mode is Pass.KEYFRAMES:
            out = []
            for r in range(3 * n):
                b = r // n
                if b == 0:
                    out.append(own(r))
                else:  # every keyframe of the branch, concatenated along the token axis
                    rows = range(b * n, (b + 1) * n)
                    keys, values = torch.cat([k[j] for j in rows]), torch.cat([v[j] for j in rows])
                    out.append(self.attend(attn, q[r], keys, values))
            out = torch.stack(out)  # (3n, N, D)
            ref.inputs.setdefault(self.site, []).extend(x[:n])
            ref.outputs.setdefault(self.site, []).extend(out.unflatten(0, (3, n)).transpose(0, 1))
            return out
        p = ref.propagation
        picks = ref.picks.popleft() if ref.picks else None  # (A, n, N)
        out = torch.empty(3 * n, x.shape[1], attn.to_out[0].out_features)
        for f in range(n):
            gathered = []
            for j, a in enumerate(ref.anchors):
                keys, values = ref.inputs[self.site][a], ref.outputs[self.site][a]  # (N, D), (3, N, D)
                cos = F.normalize(x[f], dim=-1) @ F.normalize(keys, dim=-1).T  # (N, N_key)
                best = cos.argmax(dim=-1)  # the most similar keyframe token of every token
                ref.matched += len(best)
                if picks is not None and not torch.equal(picks[j, f], best):
                    theirs = cos.gather(1, picks[j, f][:, None])[:, 0]
                    assert (theirs >= cos.max(dim=-1).values - TIE).all(), f"{self.site}: not the nearest"
                    ref.ties += int((picks[j, f] != best).sum())
                    best = picks[j, f]
                gathered.append(values[:, best])  # (3, N, D)
            prop = gathered[0] if len(gathered) == 1 else (
                ref.weights[f] * gathered[0] + (1 - ref.weights[f]) * gathered[1])
            for b in range(3):
                r = b * n + f
                out[r] = prop[b] if p == 1 else p * prop[b] + (1 - p) * own(r)
        return out


class SanaDirectProcessor(DirectProcessor, SelfAttnProcessor):
    """The same, of a type SANA's self-attention modules accept."""


@contextlib.contextmanager
def direct_hooks(bb, ref: Direct):
    """Install the direct processors (and a direct feature-injection hook) on a backbone; restore on exit."""
    kind = "sana" if isinstance(bb, SanaBackbone) else "sd"
    cls = SanaDirectProcessor if kind == "sana" else DirectProcessor
    original = bb.self_attention_processors()
    bb.set_self_attention_processors({site: cls(site, ref, kind) for site in original})

    def inject(module, inputs, out):
        if ref.mode is not Pass.PLAIN and ref.inject_features:
            return torch.cat([out[: ref.frames]] * 3)
        return None

    handles = [m.register_forward_hook(inject) for m in bb.feature_modules().values()]
    try:
        yield ref
    finally:
        for h in handles:
            h.remove()
        bb.set_self_attention_processors(original)


def _rows(cond, n):
    return cond.take([0] * n + [1] * n + [2] * n)


# --------------------------------------------------------------------------------------------
# (a, b) one hooked denoiser call against the direct processors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inject", [False, True])
@pytest.mark.parametrize("name", CONFIGS)
def test_keyframe_and_propagation_calls_equal_direct(name, inject, make, monkeypatch):
    """Keyframe pass (extended attention) then propagation passes (one / two anchors, p = 1 and 0.6)."""
    bb = make(name)
    torch.manual_seed(len(name))
    h, w = latent_grid(bb, frame_size(name))
    k, n = 3, 4
    cond = bb.embed([SOURCE, NEGATIVE, TARGET])
    t = time_of(bb)
    keys = torch.randn(3 * k, 4, h, w)
    chunk = torch.randn(3 * n, 4, h, w)
    weights = torch.rand(n)
    calls = [  # (mode, frames, anchors, weights, propagation)
        (Pass.KEYFRAMES, k, [], None, 1.0),
        (Pass.PROPAGATE, n, [2, 1], weights, 1.0),
        (Pass.PROPAGATE, n, [0], None, 1.0),
        (Pass.PROPAGATE, n, [1, 0], weights, 0.6),
    ]
    state = TokenFlowState(inject_attention=inject, inject_features=inject)
    picks = record_picks(monkeypatch)
    got, want = [], []
    with tokenflow_hooks(bb, state):
        for mode, frames, anchors, wts, p in calls:
            state.mode, state.frames, state.anchors, state.weights = mode, frames, anchors, wts
            state.propagation = p
            got.append(bb.denoise(keys if mode is Pass.KEYFRAMES else chunk, t, _rows(cond, frames)))
    ref = Direct(bb.pnp_attention_sites(), picks)
    ref.inject_attention = ref.inject_features = inject
    with direct_hooks(bb, ref):
        for mode, frames, anchors, wts, p in calls:
            ref.mode, ref.frames, ref.anchors, ref.weights, ref.propagation = mode, frames, anchors, wts, p
            want.append(bb.denoise(keys if mode is Pass.KEYFRAMES else chunk, t, _rows(cond, frames)))
    sites = bb.self_attention_processors()
    assert set(state.keyframe_inputs) == set(ref.inputs) == set(sites)
    for site in sites:  # the stored keyframe tokens: normalised source inputs, outputs of all branches
        torch.testing.assert_close(state.keyframe_inputs[site], torch.stack(ref.inputs[site]),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(state.keyframe_outputs[site], torch.stack(ref.outputs[site], dim=1),
                                   atol=1e-5, rtol=1e-4)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    assert not ref.picks and ref.ties <= 1 + ref.matched // 100, (ref.ties, ref.matched)  # few ties
    # the calls differ from one another (the passes do something)
    assert (got[1] - got[2]).abs().max() > 1e-4 and (got[1] - got[3]).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------
# (a, b) a whole edit against a direct TokenFlow loop
# --------------------------------------------------------------------------------------------


def direct_edit(bb, cache, settings: EditSettings, keyframes: list[list[int]], picks) -> torch.Tensor:
    """TokenFlow's edit written out: per step, the given keyframes jointly, then every chunk propagated.

    `picks`: the hooks' nearest neighbours, followed where they tie with this loop's own (see TIE).
    """
    x = cache.latents(0).float()
    frames, bs = len(x), settings.batch_size
    parts = [list(range(s, min(s + bs, frames))) for s in range(0, frames, bs)]
    cond = bb.embed([settings.source_prompt, settings.negative_prompt, settings.prompt])
    g = settings.guidance_scale
    times = cache.timesteps
    ref = Direct(bb.pnp_attention_sites(), picks)
    ref.propagation = settings.propagation
    limit = settings.max_keyframes or len(parts)
    groups = -(-len(parts) // limit)
    bounds = [round(i * len(parts) / groups) for i in range(groups + 1)]  # near-equal keyframe groups

    def call(src, cur, rows):
        out = bb.denoise(torch.cat([src[rows], cur[rows], cur[rows]]), t, _rows(cond, len(rows))).float()
        u, c = out[len(rows) : 2 * len(rows)], out[2 * len(rows) :]
        return u + g * (c - u)

    with direct_hooks(bb, ref):
        for i, t in enumerate(times):
            t_next = times[i + 1] if i + 1 < len(times) else None
            src = cache.latents(i).float()
            ref.inject_features = i < int(len(times) * settings.pnp_feature)
            ref.inject_attention = i < int(len(times) * settings.pnp_attention)
            keys = keyframes[i]
            assert len(keys) == len(parts) and all(key in part for key, part in zip(keys, parts))
            ref.clear()
            ref.mode = Pass.KEYFRAMES
            for a, b in zip(bounds[:-1], bounds[1:]):
                ref.frames = b - a
                call(src, x, keys[a:b])
            ref.mode = Pass.PROPAGATE
            new = torch.empty_like(x)
            for c, part in enumerate(parts):
                ref.frames = len(part)
                if c == 0:
                    ref.anchors, ref.weights = [0], None
                else:  # own and previous keyframe, by distance to the chunks' centres
                    prev = parts[c - 1]
                    own_centre, prev_centre = part[0] + len(part) // 2, prev[0] + len(prev) // 2
                    d1 = torch.tensor([abs(f - own_centre) for f in part], dtype=torch.float32)
                    d2 = torch.tensor([abs(f - prev_centre) for f in part], dtype=torch.float32)
                    ref.anchors, ref.weights = [c, c - 1], torch.sigmoid(d2 / (d1 + d2))
                new[part] = bb.move(x[part], call(src, x, part), t, t_next)
            x = new
    assert not ref.picks and ref.ties <= 1 + ref.matched // 100, (ref.ties, ref.matched)  # few ties
    return x


EDITS = [  # (config, frames, batch size, edit seed, guidance, propagation, max keyframes)
    ("sd15", 5, 2, 1, 7.5, 1.0, None),
    ("sd2", 7, 3, 3, 5.0, 0.7, None),
    ("sd-2level", 3, 4, 2, 1.0, 1.0, None),  # one chunk larger than the video
    ("sd15", 7, 2, 5, 7.5, 1.0, 3),  # 4 keyframes in two joint groups of 2
    ("sana-h3-l3", 7, 3, 1, 4.5, 0.7, None),
    ("sana-h4-l1-p2-qknorm", 5, 2, 4, 0.0, 1.0, None),  # guidance 0: the negative prompt's prediction
    ("sana-h1-l4-p2-bias", 4, 5, 2, 1.0, 0.4, None),
    ("sana-h3-l3", 5, 1, 6, 4.5, 1.0, 2),  # a chunk per frame: 5 keyframes in joint groups of 2, 1, 2
]


@pytest.mark.parametrize("name,frames,bs,seed,guidance,prop,max_keys", EDITS)
def test_edit_equals_direct_loop(name, frames, bs, seed, guidance, prop, max_keys, make, tmp_path,
                                 monkeypatch):
    bb = make(name)
    pipe = VideoEditPipeline(bb, cache_dir=tmp_path)
    clip = pipe.prepare(video(frames, frame_size(name), seed=seed))
    assert clip.frames.shape[1:3] == frame_size(name)
    inv = pipe.invert(clip, SOURCE, steps=2, batch_size=bs, progress=False, inversion_refine=0)
    settings = EditSettings(TARGET, source_prompt=SOURCE, negative_prompt=NEGATIVE, steps=2, batch_size=bs,
                            seed=seed, guidance_scale=guidance, propagation=prop, max_keyframes=max_keys,
                            pnp_feature=0.8, pnp_attention=0.5,  # 2 steps: both inject in step 0 only
                            cross_attention=0.0, local_blend=0.0, output_propagation=0.0)
    picked = []
    pick = editor_module.pick_keyframes
    monkeypatch.setattr(editor_module, "pick_keyframes",
                        lambda parts, gen: picked.append(pick(parts, gen)) or picked[-1])
    picks = record_picks(monkeypatch)
    edited = edit_latents(bb, inv.cache, settings)
    assert edited.shape == inv.cache.latents(0).shape and len(picked) == 2
    direct = direct_edit(bb, inv.cache, settings, picked, picks)
    torch.testing.assert_close(edited, direct, atol=1e-4, rtol=1e-4)


def test_edit_seeds_pick_other_keyframes(make, tmp_path):
    """The keyframe draw follows the edit seed (frames of a chunk differ, so the edit does)."""
    bb = make("sana-h3-l3")
    pipe = VideoEditPipeline(bb, cache_dir=tmp_path)
    inv = pipe.invert(pipe.prepare(video(6, frame_size("sana-h3-l3"))), SOURCE, steps=2, progress=False)
    settings = [EditSettings(TARGET, source_prompt=SOURCE, steps=2, batch_size=3, seed=s, local_blend=0.0,
                             cross_attention=0.0, output_propagation=0.0) for s in (1, 1, 2, 3)]
    a, b, *others = (edit_latents(bb, inv.cache, s) for s in settings)
    torch.testing.assert_close(a, b)
    assert any((o - a).abs().max() > 1e-4 for o in others)


# --------------------------------------------------------------------------------------------
# (c) a single frame without injection is plain sampling
# --------------------------------------------------------------------------------------------

SINGLE = [(name, seed, guidance) for name in CONFIGS for seed, guidance in ((0, 7.5),)]
SINGLE += [("sd2", 1, 1.0), ("sana-h4-l1-p2-qknorm", 1, 0.0), ("sana-h1-l4-p2-bias", 2, 4.5),
           ("sd15", 2, 0.0)]


@pytest.mark.parametrize("name,seed,guidance", SINGLE)
def test_single_frame_without_injection_equals_plain_sampling(name, seed, guidance, make, tmp_path):
    bb = make(name, seed)
    pipe = VideoEditPipeline(bb, cache_dir=tmp_path)
    clip = pipe.prepare(video(1, frame_size(name), seed=seed))
    steps = 3
    inv = pipe.invert(clip, SOURCE, steps=steps, progress=False, inversion_refine=0)
    # cross-attention control and local blending (SANA's defaults) are other edits; PnP thresholds 0
    settings = EditSettings(TARGET, source_prompt=SOURCE, negative_prompt=NEGATIVE, steps=steps, seed=seed,
                            guidance_scale=guidance, pnp_feature=0.0, pnp_attention=0.0, cross_attention=0.0,
                            local_blend=0.0)
    conds = bb.embed([NEGATIVE, TARGET])
    plain = sample_plain(bb, inv.cache.latents(0), conds.take([1]), inv.cache.timesteps, 8,
                         uncond=conds.take([0]), guidance_scale=guidance)
    # the backbone's default propagation and output propagation (SANA: both on; along flow with the frames)
    for frames in (clip.frames, None):
        torch.testing.assert_close(edit_latents(bb, inv.cache, settings, frames), plain, atol=1e-4, rtol=1e-4)
    for extra in (dict(propagation=0.5), dict(correspondence="flow", output_propagation=1.0),
                  dict(mode="per-frame")):
        edited = edit_latents(bb, inv.cache, EditSettings(**{**settings.__dict__, **extra}), clip.frames)
        torch.testing.assert_close(edited, plain, atol=1e-4, rtol=1e-4)
    # with injection on, the edit differs (the hooks do something)
    injected = EditSettings(**{**settings.__dict__, "pnp_feature": 0.8, "pnp_attention": 0.5})
    assert (edit_latents(bb, inv.cache, injected) - plain).abs().max() > 1e-5


# --------------------------------------------------------------------------------------------
# (d) the latent cache round-trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_latent_cache_round_trips(name, make, tmp_path):
    bb = make(name)
    pipe = VideoEditPipeline(bb, cache_dir=tmp_path)
    size = frame_size(name)
    clip = pipe.prepare(video(3, size))
    kw = dict(steps=3, batch_size=2, progress=False, inversion_refine=0)
    first = pipe.invert(clip, SOURCE, **kw)
    h, w = latent_grid(bb, size)
    assert not first.reused
    again = pipe.invert(clip, SOURCE, **kw)
    reloaded = LatentCache(first.cache.folder)
    assert again.reused and again.cache.folder == first.cache.folder
    assert reloaded.timesteps == first.cache.timesteps == bb.timesteps(3)
    for i in range(3):
        assert first.cache.latents(i).shape == (3, 4, h, w) and first.cache.latents(i).dtype == torch.float32
        assert torch.equal(reloaded.latents(i), first.cache.latents(i))
    assert torch.equal(reloaded.clean(), encode_frames(bb, clip.frames, 2))
    assert not torch.equal(reloaded.latents(0), reloaded.clean())
    # an edit from the reloaded cache is the same edit
    settings = EditSettings(TARGET, source_prompt=SOURCE, steps=3, batch_size=2)
    torch.testing.assert_close(edit_latents(bb, reloaded, settings, clip.frames),
                               edit_latents(bb, first.cache, settings, clip.frames))
    # another prompt, size or step count misses the cache
    other = pipe.invert(clip, "a circle", **kw)
    assert not other.reused and other.cache.folder != first.cache.folder
    cropped = pipe.prepare(clip.frames[:, : size[0] - bb.multiple])
    assert not pipe.invert(cropped, SOURCE, **kw).reused
    assert not pipe.invert(clip, SOURCE, **{**kw, "steps": 2}).reused


def test_latent_cache_keeps_dtypes_shapes_and_float_times(tmp_path):
    """Any tensors and times written come back bit for bit; a different key finds nothing."""
    key = InversionKey(video="v", model="m", height=24, width=40, num_frames=5, steps=3, inversion_steps=7,
                       prompt="ünïcode \"prompt\"\n", refine=2)
    times = [0.9999999999999, 1 / 3, 2e-7]
    g = torch.Generator().manual_seed(0)
    latents = {step_key(i): torch.randn(5, 3, 6, 10, generator=g).to(dtype)
               for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16))}
    latents["clean"] = torch.randn(5, 3, 6, 10, generator=g)[..., ::2]  # not contiguous
    written = LatentCache.write(tmp_path, key, times, latents)
    found = LatentCache.find(tmp_path, key)
    assert found is not None and found.folder == written.folder and found.timesteps == times
    for i in range(3):
        got = found.latents(i)
        assert got.dtype == latents[step_key(i)].dtype and torch.equal(got, latents[step_key(i)])
    assert torch.equal(found.clean(), latents["clean"])
    assert LatentCache.find(tmp_path, InversionKey(**{**key.__dict__, "refine": 0})) is None
    assert LatentCache.find(tmp_path, InversionKey(**{**key.__dict__, "prompt": "other"})) is None


# --------------------------------------------------------------------------------------------
# Output propagation along token matches on grids a UNet rounds up
# --------------------------------------------------------------------------------------------


# (latent_index itself on those grids: test_tokenflow.py::test_latent_index_equals_direct)


def test_sd_output_propagation_along_tokens_on_odd_latents(make, tmp_path):
    """9 x 7 latents: the finest self-attention grid is 5 x 4; carrying along its matches works (a single
    frame is its own keyframe: nothing changes) and changes a multi-frame edit."""
    bb = make("sd-late-attention")
    pipe = VideoEditPipeline(bb, cache_dir=tmp_path)
    kw = dict(steps=2, progress=False, inversion_refine=0)
    one = pipe.invert(pipe.prepare(video(1, frame_size("sd-late-attention"))), SOURCE, **kw)
    four = pipe.invert(pipe.prepare(video(4, frame_size("sd-late-attention"))), SOURCE, **kw)
    assert one.cache.latents(0).shape[-2:] == (9, 7)

    def run(inv, weight):
        settings = EditSettings(TARGET, source_prompt=SOURCE, steps=2, batch_size=2,
                                output_propagation=weight, output_propagation_steps=1.0,
                                output_correspondence="tokens")
        return edit_latents(bb, inv.cache, settings)

    torch.testing.assert_close(run(one, 1.0), run(one, 0.0), atol=1e-5, rtol=1e-5)
    carried, off = run(four, 1.0), run(four, 0.0)
    assert torch.isfinite(carried).all() and (carried - off).abs().max() > 1e-4
