"""The TokenFlow editing loop, written once against the `Backbone` protocol.

Per denoising step t (noisiest first), with the source latents of step t read from the inversion
cache: pick one random keyframe per chunk of `batch_size` frames; run the keyframes jointly
(`Pass.KEYFRAMES`: extended attention, PnP injection from the source branch) so every self-attention
site stores its keyframe tokens; then run every chunk (`Pass.PROPAGATE`): self-attention outputs are
copied from the chunk's keyframe and the previous chunk's keyframe along nearest-neighbour
correspondences, blended by frame distance. In every pass of the leading `cross_attention` steps the
target branch's cross-attention takes the source branch's (token-aligned) probabilities, as in
Prompt-to-Prompt (`cross_attention.py`), with the edited words' optionally re-weighted.
Classifier-free guidance combines the two edit branches; in the leading `output_propagation_steps`
each frame's guided prediction inside the edit is mixed with its keyframes' (carried along DIS flow
or the token matches), and the backbone's `move` takes the step. Model calls see one chunk (or the
keyframes) at a time, so device memory holds one chunk's activations plus the keyframe tokens (moved
to the CPU for long videos), whatever the video length; only the latents themselves (a few MB) stay on
the device for every frame, so the loop never waits for the host between chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, InputError, unknown_choice
from .attention import NUM_BRANCHES, Pass, TokenFlowState, blend_weights, latent_index, propagate
from .backbones import TOKENFLOW_NEGATIVE, Backbone, TextCond, tokenflow_hooks
from .blend import blend, edit_masks
from .correspondence import CORRESPONDENCES, FlowCorrespondence
from .cross_attention import align_tokens, edited_positions
from .injection import injection_steps
from .inversion import LatentCache

MODES = ("tokenflow-pnp", "tokenflow-sdedit", "per-frame")
OUTPUT_CORRESPONDENCES = ("flow", "tokens")
MAX_CROSS_REWEIGHT = 20.0  # beyond it a word's probability swamps every other caption token
OFFLOAD_KEYFRAMES = 16


@dataclass
class EditSettings:
    """Settings of one edit (TokenFlow's defaults)."""

    prompt: str
    source_prompt: str = ""
    negative_prompt: str = TOKENFLOW_NEGATIVE  # the pipeline passes the backbone's default
    mode: str = "tokenflow-pnp"
    steps: int = 50
    guidance_scale: float = 7.5
    pnp_feature: float = 0.8  # fraction of leading steps with residual-feature injection
    pnp_attention: float = 0.5  # fraction of leading steps with self-attention q/k injection
    # Fraction of leading steps whose target cross-attention takes the source's probabilities
    # (Prompt-to-Prompt); None = the backbone's default (SANA 0.5, SD 0), at most `pnp_attention`, so
    # both PnP thresholds at 0 turn it off as well. Like PnP, only PnP modes use it.
    cross_attention: float | None = None
    # While that control runs: factor of the target's cross-attention probabilities at the edited
    # words (Prompt-to-Prompt re-weighting; 1 = off); None = the backbone's default.
    cross_reweight: float | None = None
    # Weight of the keyframes' propagated self-attention tokens against each frame's own attention
    # output (PnP-injected, per frame) in the propagation pass: 1 = TokenFlow's pure propagation, 0 =
    # per-frame attention; None = the backbone's default (SD 1, SANA `SANA_PROPAGATION`). TokenFlow modes only.
    propagation: float | None = None
    # Output propagation: inside the edit (the local-blend mask; everywhere without one) each frame's
    # guided prediction is mixed with its two keyframes' predictions carried along the same
    # correspondences (those of the finest self-attention grid), weight `output_propagation`, in the
    # leading `output_propagation_steps` fraction of the steps. It carries what the frame's own latent
    # decides (an edited object's colour) from the keyframes. 0 = off; None = the backbone's default
    # (SD 0: TokenFlow's published behaviour). TokenFlow modes only.
    output_propagation: float | None = None
    output_propagation_steps: float | None = None  # None = the backbone's default
    # Where output propagation takes the keyframes' predictions from: "flow" (DIS optical flow between
    # the source frames, sampled bilinearly at the latent grid) or "tokens" (the self-attention
    # correspondences, whole tokens); None = "flow" when the source frames are given, else "tokens".
    output_correspondence: str | None = None
    strength: float = 0.9  # tokenflow-sdedit: fraction of the schedule that is re-run
    batch_size: int = 8  # frames per chunk (one keyframe each) and per denoiser call
    seed: int = 1
    correspondence: str = "features"
    control_scale: float | None = None  # ControlNet weight; None = no ControlNet
    # Keep keyframe tokens on the CPU between the keyframe and propagation passes; None = when
    # there are more than OFFLOAD_KEYFRAMES keyframes (device memory then stays flat with length;
    # below that the tokens are small, ~1.5 GB for SD at 512 px, and stay on the device).
    offload_keyframes: bool | None = None
    # At most this many keyframes attend to each other in one joint pass; more are run in
    # consecutive groups, which bounds device memory for very long videos. None = all at once.
    max_keyframes: int | None = 32
    # Local blending (`blend.py`): edit only inside a per-frame mask where the target and source
    # prompts' predictions differ by at least this fraction of the frame's largest difference;
    # outside it every step keeps the source's inverted latent. 0 = off; None = the backbone's
    # default (SANA 0.5, SD 0: TokenFlow's published behaviour). Every mode takes it.
    local_blend: float | None = None
    blend_grow: int = 1  # latent pixels the mask is grown by
    # With local blending: put the source frames' own pixels back outside the (upsampled) mask after
    # decoding (`blend.paste_source`). The pipeline applies it; edit_latents returns the masks for it.
    paste_source: bool = True

    def validate(self) -> None:
        """Raise a `ConfigError` naming the first invalid setting."""
        if self.mode not in MODES:
            raise unknown_choice("mode", self.mode, MODES)
        if self.correspondence not in CORRESPONDENCES:
            raise unknown_choice("correspondence", self.correspondence, CORRESPONDENCES)
        if self.output_correspondence is not None and self.output_correspondence not in OUTPUT_CORRESPONDENCES:
            raise unknown_choice("output_correspondence", self.output_correspondence, OUTPUT_CORRESPONDENCES)
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0 <= self.guidance_scale < float("inf"):  # refuses NaN as well
            raise ConfigError(f"--cfg must be a finite number >= 0, got {self.guidance_scale}")
        if self.control_scale is not None and not 0 <= self.control_scale < float("inf"):
            raise ConfigError(f"--controlnet-scale must be a finite number >= 0, got {self.control_scale}")
        if self.max_keyframes is not None and self.max_keyframes < 1:
            raise ConfigError(f"max_keyframes must be at least 1 (or None for all), got {self.max_keyframes}")
        fractions = {"pnp_feature": "--pnp-feature", "pnp_attention": "--pnp-attn", "strength": "--strength",
                     "cross_attention": "--cross-attn", "propagation": "--propagation",
                     "output_propagation": "--output-propagation",
                     "output_propagation_steps": "--output-propagation-steps"}
        for name, flag in fractions.items():
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{flag} ({name}) must lie in [0, 1], got {value}")
        if self.cross_reweight is not None and not 0.0 <= self.cross_reweight <= MAX_CROSS_REWEIGHT:
            raise ConfigError(f"--cross-reweight must lie in [0, {MAX_CROSS_REWEIGHT:g}] (1 = off), "
                              f"got {self.cross_reweight}")
        if self.local_blend is not None and not 0.0 <= self.local_blend < 1.0:
            raise ConfigError(f"--local-blend must lie in [0, 1) (a fraction of each frame's largest prompt "
                              f"difference; 0 = off), got {self.local_blend}")
        if self.blend_grow < 0:
            raise ConfigError(f"blend_grow must be at least 0, got {self.blend_grow}")
        if self.mode == "tokenflow-sdedit" and int(self.strength * self.steps) < 1:
            raise ConfigError(f"--strength {self.strength} leaves no step of {self.steps} to run; raise it")

    def start_step(self) -> int:
        """Index of the first editing step (SDEdit skips the noisiest part of the schedule)."""
        if self.mode == "tokenflow-sdedit":
            return self.steps - int(self.strength * self.steps)
        return 0


def chunks(num_frames: int, batch_size: int) -> list[range]:
    """Consecutive frame ranges of at most `batch_size` frames."""
    return [range(s, min(s + batch_size, num_frames)) for s in range(0, num_frames, batch_size)]


def keyframe_groups(num_keyframes: int, max_keyframes: int | None) -> list[range]:
    """Split keyframes into near-equal consecutive groups of at most `max_keyframes` (None: one group)."""
    if max_keyframes is None or num_keyframes <= max_keyframes:
        return [range(num_keyframes)]
    groups = -(-num_keyframes // max_keyframes)
    bounds = [round(g * num_keyframes / groups) for g in range(groups + 1)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def pick_keyframes(parts: list[range], generator: torch.Generator) -> list[int]:
    """One random frame per chunk (TokenFlow draws anew at every step)."""
    return [p.start + int(torch.randint(len(p), (1,), generator=generator)) for p in parts]


def anchors_of(parts: list[range], b: int) -> tuple[list[int], torch.Tensor | None]:
    """Keyframe slots chunk b copies from (its own, then the previous chunk's) and the weight of its own.

    The weight follows the public implementation: w = sigmoid(d_prev / (d_own + d_prev)) with the
    distances of each frame to the two chunks' centres.
    """
    if b == 0:
        return [0], None
    frames = torch.arange(parts[b].start, parts[b].stop)
    own = parts[b].start + len(parts[b]) // 2
    prev = parts[b - 1].start + len(parts[b - 1]) // 2
    return [b, b - 1], blend_weights(frames, own, prev)


class _Caller:
    """One guided denoiser call on three branches [source, negative, target] of chosen frames."""

    def __init__(self, backbone: Backbone, conds: TextCond, guidance: float, control: torch.Tensor | None,
                 control_scale: float | None):
        self.backbone, self.conds, self.guidance = backbone, conds, guidance
        self.control, self.control_scale = control, control_scale
        self._stacked: dict[int, TextCond] = {}  # per frame count: built once, not uploaded per call

    def cond(self, n: int) -> TextCond:
        """The prompt rows of a call on n frames per branch."""
        if n not in self._stacked:
            self._stacked[n] = self.conds.take([0] * n + [1] * n + [2] * n)
        return self._stacked[n]

    def __call__(self, source: torch.Tensor, current: torch.Tensor, t: float, frames: list[int]) -> torch.Tensor:
        n = len(frames)
        x = torch.cat([source, current, current])  # (3n, C, h, w)
        control = scale = None
        if self.control is not None:
            control = self.control[frames].repeat(NUM_BRANCHES, 1, 1, 1)  # (3n, 3, H, W)
            # The source branch rebuilds the source video: it gets no control.
            scale = torch.tensor([0.0] * n + [float(self.control_scale)] * (2 * n))
        out = self.backbone.denoise(x, t, self.cond(n), control, scale).float()  # (3n, C, h, w)
        uncond, cond_out = out[n : 2 * n], out[2 * n :]
        return uncond + self.guidance * (cond_out - uncond)  # (n, C, h, w)


def token_map(backbone: Backbone, source_prompt: str, prompt: str) -> torch.Tensor:
    """(L,) long: the source caption position whose cross-attention probability each target position takes, or -1."""
    return torch.tensor(align_tokens(*_caption_ids(backbone, source_prompt, prompt)), dtype=torch.long)


def token_weights(backbone: Backbone, source_prompt: str, prompt: str, factor: float) -> torch.Tensor:
    """(L,) float: `factor` at the target caption positions that differ from the source's, 1 elsewhere."""
    edited = torch.tensor(edited_positions(*_caption_ids(backbone, source_prompt, prompt)))
    return torch.where(edited, float(factor), 1.0)


def _caption_ids(backbone: Backbone, source_prompt: str, prompt: str) -> tuple[list, list, list | None, list | None]:
    """Source ids, target ids, source mask, target mask (None: no mask) of the two captions, as lists."""
    ids, mask = backbone.token_ids([source_prompt, prompt])  # (2, L) each
    masks = (None, None) if mask is None else (mask[0].tolist(), mask[1].tolist())
    return ids[0].tolist(), ids[1].tolist(), *masks


def _rows(x: torch.Tensor, frames: list[int]) -> torch.Tensor:
    """x[frames] without a host sync (the index goes up asynchronously)."""
    index = torch.tensor(frames).to(x.device, non_blocking=True)
    return x.index_select(0, index)


def _carry_output(guided: torch.Tensor, key_flat: torch.Tensor, state: TokenFlowState, weight: float,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """Mix a chunk's guided predictions (n, C, h, w) with its anchor keyframes' along the recorded correspondences."""
    if state.token_index is None:
        raise RuntimeError("output propagation: no self-attention site recorded its correspondences")
    n, c, h, w = guided.shape
    index = latent_index(state.token_index, h, w)  # (A, n, h*w)
    anchors = torch.stack([key_flat[a] for a in state.anchors])[None]  # (1, A, h*w, C)
    carried = propagate(anchors, index, state.weights)[0]  # (n, h*w, C)
    return _mix_inside(guided, carried.transpose(1, 2).reshape(n, c, h, w), weight, mask)


def _mix_inside(guided: torch.Tensor, carried: torch.Tensor, weight: float, mask: torch.Tensor | None) -> torch.Tensor:
    """guided + weight x (carried - guided), inside the (n, 1, h, w) edit mask only (everywhere without one)."""
    mix = weight if mask is None else weight * mask.to(guided.dtype)
    return guided + mix * (carried.to(guided.dtype) - guided)


def _warp_output(guided: torch.Tensor, key_all: torch.Tensor, state: TokenFlowState, flow: FlowCorrespondence,
                 frames: list[int], anchor_frames: list[int], weight: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Mix a chunk's guided predictions (n, C, h, w) with its anchor keyframes' warped by optical flow."""
    n, c, h, w = guided.shape
    warped = []
    for slot, key in zip(state.anchors, anchor_frames):
        grid = torch.stack([flow.sample_grid(f, key, h, w) for f in frames]).to(guided.device, non_blocking=True)
        source = key_all[slot : slot + 1].expand(n, c, h, w).to(guided.dtype)
        warped.append(torch.nn.functional.grid_sample(source, grid, mode="bilinear", padding_mode="border",
                                                      align_corners=False))  # (n, C, h, w)
    if len(warped) == 1:
        carried = warped[0]
    else:
        wt = state.weights.to(guided.device, guided.dtype).view(n, 1, 1, 1)
        carried = wt * warped[0] + (1 - wt) * warped[1]
    return _mix_inside(guided, carried, weight, mask)


@torch.no_grad()
def edit_latents(
    backbone: Backbone,
    cache: LatentCache,
    settings: EditSettings,
    source_frames: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
    return_masks: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Run the edit of `settings` on an inverted video; return the edited latents (T, C, h, w) on the CPU.

    `source_frames` (T, H, W, 3) uint8 (the resized source) are needed for flow correspondences and
    ControlNet. With `return_masks`: (latents, the local-blend masks (T, 1, h, w) on the CPU, or None
    when the blend is off).
    """
    settings.validate()
    times = cache.timesteps
    if len(times) != settings.steps:
        raise ConfigError(f"the inversion cache holds {len(times)} steps but the edit asks for {settings.steps}")
    out_weight = settings.output_propagation
    if out_weight is None:
        out_weight = backbone.default_output_propagation
    out_corr = settings.output_correspondence
    if out_corr is None:
        out_corr = "flow" if source_frames is not None else "tokens"
    out_flow = out_weight > 0 and settings.mode != "per-frame" and out_corr == "flow"
    needs_frames = settings.correspondence == "flow" or settings.control_scale is not None or out_flow
    if needs_frames and source_frames is None:
        why = [n for n, on in (("flow correspondences", settings.correspondence == "flow"),
                                ("ControlNet", settings.control_scale is not None),
                                ("output propagation along flow", out_flow)) if on]
        raise InputError(f"{' and '.join(why)} need the source frames; pass source_frames"
                         + (" (or output_correspondence='tokens' / output_propagation=0)" if out_flow else ""))
    start = settings.start_step()
    device = backbone.device
    # All frames' latents stay on the device (a few MB even for long videos): chunks are slices of
    # them, so no step waits for a copy back to the host.
    x = cache.latents(start).to(device, torch.float32)  # (T, C, h, w)
    num_frames = len(x)
    parts = chunks(num_frames, settings.batch_size)
    conds = backbone.embed([settings.source_prompt, settings.negative_prompt, settings.prompt])
    control = backbone.control_images(source_frames) if settings.control_scale is not None else None
    call = _Caller(backbone, conds, settings.guidance_scale, control, settings.control_scale)
    flow = FlowCorrespondence(source_frames) if settings.correspondence == "flow" or out_flow else None
    token_flow = flow if settings.correspondence == "flow" else None  # for the self-attention sites
    pnp = settings.mode != "tokenflow-sdedit"
    n_feature = injection_steps(settings.steps, settings.pnp_feature) if pnp else 0
    n_attention = injection_steps(settings.steps, settings.pnp_attention) if pnp else 0
    cross = settings.cross_attention
    if cross is None:
        # The control replaces the edited branch's attention maps, as PnP's attention injection
        # does: by default it never outlasts that injection (both off: plain sampling).
        cross = min(backbone.default_cross_attention, settings.pnp_attention)
    n_cross = injection_steps(settings.steps, cross) if pnp else 0
    generator = torch.Generator().manual_seed(settings.seed)
    offload = settings.offload_keyframes
    if offload is None:
        offload = len(parts) > OFFLOAD_KEYFRAMES
    state = TokenFlowState(store_device=torch.device("cpu") if offload else None)
    state.propagation = backbone.default_propagation if settings.propagation is None else settings.propagation
    out_steps = settings.output_propagation_steps
    if out_steps is None:
        out_steps = backbone.default_output_propagation_steps
    n_output = injection_steps(settings.steps, out_steps) if out_weight > 0 else 0
    if settings.mode == "per-frame":
        n_output = 0
    if n_cross > start:
        state.token_map = token_map(backbone, settings.source_prompt, settings.prompt).to(device)
        reweight = backbone.default_cross_reweight if settings.cross_reweight is None else settings.cross_reweight
        if reweight != 1.0:
            state.token_weights = token_weights(backbone, settings.source_prompt, settings.prompt,
                                                reweight).to(device)
    # Anchors and blend weights per chunk are the same at every step: put them on the device once.
    plans = []
    for b in range(len(parts)):
        slots, weights = anchors_of(parts, b)
        plans.append((slots, None if weights is None else weights.to(device)))

    masks = None
    threshold = backbone.default_local_blend if settings.local_blend is None else settings.local_blend
    if threshold > 0:
        masks = edit_masks(backbone, cache, settings.source_prompt, settings.prompt, threshold,
                           settings.batch_size, settings.blend_grow).to(device)  # (T, 1, h, w)

    with tokenflow_hooks(backbone, state):
        for i in range(start, settings.steps):
            t = times[i]
            t_next = times[i + 1] if i + 1 < settings.steps else None
            source = cache.latents(i).to(device, torch.float32, non_blocking=True)  # (T, C, h, w)
            state.inject_features = i < n_feature
            state.inject_attention = i < n_attention
            state.inject_cross = i < n_cross
            new = torch.empty_like(x)
            if settings.mode == "per-frame":
                state.mode = Pass.PER_FRAME
                for part in parts:
                    rows = slice(part.start, part.stop)
                    state.frames = len(part)
                    guided = call(source[rows], x[rows], t, list(part))
                    new[rows] = backbone.move(x[rows], guided, t, t_next)
                    if progress is not None:
                        progress(1)
            else:
                keys = pick_keyframes(parts, generator)
                state.clear()
                state.mode = Pass.KEYFRAMES
                state.keyframe_slots = len(keys)
                carry_output = i < n_output
                key_out = []  # the keyframes' guided predictions, (K, C, h, w) in all
                for group in keyframe_groups(len(keys), settings.max_keyframes):
                    sel = keys[group.start : group.stop]
                    state.frames = len(sel)
                    state.keyframe_offset = group.start
                    out = call(_rows(source, sel), _rows(x, sel), t, sel)  # also fills state.keyframe_*
                    if carry_output:
                        key_out.append(out)
                state.mode = Pass.PROPAGATE
                state.record_index = carry_output and not out_flow
                key_all = torch.cat(key_out) if carry_output else None  # (K, C, h, w)
                for b, part in enumerate(parts):
                    rows = slice(part.start, part.stop)
                    state.frames = len(part)
                    state.anchors, state.weights = plans[b]
                    anchor_frames = [keys[a] for a in state.anchors]
                    state.matcher = None if token_flow is None else token_flow.matcher(list(part), anchor_frames)
                    state.token_index = None
                    guided = call(source[rows], x[rows], t, list(part))
                    if carry_output:
                        mask = None if masks is None else masks[rows]
                        if out_flow:
                            guided = _warp_output(guided, key_all, state, flow, list(part), anchor_frames,
                                                  out_weight, mask)
                        else:
                            guided = _carry_output(guided, key_all.flatten(2).transpose(1, 2), state, out_weight,
                                                   mask)
                    new[rows] = backbone.move(x[rows], guided, t, t_next)
                    if progress is not None:
                        progress(1)
                state.clear()
                state.record_index, state.token_index = False, None
            if masks is not None:
                # outside the mask: the source's own latent at the next time (the clean frame at the end)
                after = cache.latents(i + 1) if t_next is not None else cache.clean()
                new = blend(new, after.to(device, torch.float32), masks)
            x = new
    if return_masks:
        return x.cpu(), None if masks is None else masks.cpu()
    return x.cpu()


def calls_per_step(settings: EditSettings, num_frames: int) -> int:
    """Denoiser calls of one editing step that report progress (one per chunk)."""
    return len(chunks(num_frames, settings.batch_size))
