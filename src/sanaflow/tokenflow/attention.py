"""TokenFlow's self-attention: keyframe extended attention and token propagation, as processors.

Every denoiser call of the editor stacks three branches of `n` frames each along the batch axis:
``[source (n), negative / unconditional (n), target (n)]``. A `TokenFlowAttnProcessor` sits on every
self-attention site of the backbone and reads the explicit `TokenFlowState` the editor fills before
each call:

- `Pass.PLAIN`: the site's original processor runs (inversion, reconstruction, plain sampling).
- `Pass.KEYFRAMES`: the joint keyframe pass. The source branch attends per frame; each edit branch
  attends to the keys and values of *all* its keyframes concatenated along the token axis (one
  batched attention call per branch, never a loop over frames). With PnP attention injection on, the
  edit branches use the source branch's queries and keys. The site stores its normalised input
  (source branch) and its output (all branches) for the propagation pass. Very long videos may run
  their keyframes in several consecutive groups (one call each); the stored tokens are appended.
- `Pass.PROPAGATE`: each token takes the stored outputs of its nearest neighbours in the anchor
  keyframes and blends them (`propagate`); attention is not computed. With `state.propagation` below
  1 the frame also attends to itself, as in `Pass.PER_FRAME`, and the site returns
  ``p * propagated + (1 - p) * own`` (p = 1: TokenFlow's pure propagation; p = 0: per-frame attention).
- `Pass.PER_FRAME`: PnP on each frame alone (the baseline): every branch attends per frame.

The arithmetic of one attention (projections, softmax or linear kernel, output projection) belongs
to the backbone and comes in as an `AttentionOps`; this module only decides who attends to whom.
Cross-attention (Prompt-to-Prompt control) reads the same state; it lives in `cross_attention.py`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

NUM_BRANCHES = 3  # source, negative (unconditional), target


class Pass(enum.Enum):
    """What the hooks do during one denoiser call."""

    PLAIN = "plain"
    KEYFRAMES = "keyframes"
    PROPAGATE = "propagate"
    PER_FRAME = "per-frame"


# (site, source-branch inputs of the frames (n, N, D), anchor keyframe inputs (A, N, D)) -> (A, n, N)
Matcher = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TokenFlowState:
    """Per-call instructions the editor gives the hooks, and the keyframe tokens they store."""

    mode: Pass = Pass.PLAIN
    frames: int = 0  # frames per branch in the current call (the batch is NUM_BRANCHES * frames)
    inject_attention: bool = False  # PnP: source queries/keys replace the edit branches' ones
    inject_features: bool = False  # PnP: source residual features replace the edit branches' ones
    # Prompt-to-Prompt: the target branch's cross-attention probabilities come from the source
    # branch's, column j from source caption position token_map[j] (-1: the target's own column).
    inject_cross: bool = False
    token_map: torch.Tensor | None = None  # (L,) long, on the device; built once per edit
    # With the control on: factors of the target's probability columns (Prompt-to-Prompt re-weighting
    # of the edited words), (L,) float on the device; None = all 1.
    token_weights: torch.Tensor | None = None
    # Propagation: keyframe slots (indices into the stored keyframes) the current frames copy from,
    # and the weight of the first slot per frame (the second gets 1 - w).
    anchors: list[int] = field(default_factory=list)
    weights: torch.Tensor | None = None  # (frames,)
    matcher: Matcher | None = None  # None: nearest neighbours of the normalised inputs
    # Weight of the propagated tokens against the frame's own (per-frame, PnP-injected) attention
    # output in Pass.PROPAGATE; 1 computes no own attention.
    propagation: float = 1.0
    # Output propagation (the editor's, on the denoiser's output): when set, the propagation pass
    # keeps the correspondences of the site with the finest token grid (the last one on ties) in
    # `token_index` (A, n, N), for the editor to carry to the latent grid.
    record_index: bool = False
    token_index: torch.Tensor | None = None
    # Where keyframe tokens are kept between the passes (None: where they were computed). The CPU
    # keeps device memory flat for long videos; propagation fetches only its two anchors.
    store_device: torch.device | None = None
    # Keyframes that come in several groups (one call each): the step's total, and the slot of the
    # current group's first keyframe. None: the current call holds all keyframes.
    keyframe_slots: int | None = None
    keyframe_offset: int = 0
    # Written by the keyframe pass, read by the propagation pass; per site.
    keyframe_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # (K, N, D)
    keyframe_outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # (3, K, N, D)

    def clear(self) -> None:
        """Forget the stored keyframe tokens (between denoising steps)."""
        self.keyframe_inputs.clear()
        self.keyframe_outputs.clear()
        self.keyframe_slots, self.keyframe_offset = None, 0


class AttentionOps(Protocol):
    """The backbone's attention arithmetic, split so TokenFlow can regroup tokens between the steps."""

    def project(self, attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values (B, heads, N, d) of the self-attention input x (B, N, D)."""

    def attend(self, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of q (B, h, Nq, d) over k, v (B, h, Nk, d) -> (B, h, Nq, d)."""

    def output(self, attn: Any, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Output projection of o (B, h, N, d) -> (B, N, D) (x is the input, for residual settings)."""


# --------------------------------------------------------------------------------------------
# Pure functions (tested against direct implementations)
# --------------------------------------------------------------------------------------------


def extended_attention(
    ops: AttentionOps, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int
) -> torch.Tensor:
    """Source branch per frame; each edit branch over all its frames' tokens concatenated.

    q, k, v: (3 * frames, h, N, d) in branch-major order. Returns (3 * frames, h, N, d).
    """
    n = frames
    _, h, tokens, d = q.shape
    source = ops.attend(attn, q[:n], k[:n], v[:n])  # (n, h, N, d)

    def joint(t: torch.Tensor) -> torch.Tensor:
        # (2n, h, N, d) -> (2, h, n*N, d): one sequence per edit branch holding every frame's tokens
        return t[n:].reshape(2, n, h, tokens, d).permute(0, 2, 1, 3, 4).reshape(2, h, n * tokens, d)

    edit = ops.attend(attn, joint(q), joint(k), joint(v))  # (2, h, n*N, d)
    edit = edit.reshape(2, h, n, tokens, d).permute(0, 2, 1, 3, 4).reshape(2 * n, h, tokens, d)
    return torch.cat([source, edit])  # (3n, h, N, d)


def nearest_tokens(queries: torch.Tensor, keys: torch.Tensor, max_elements: int = 2**26) -> torch.Tensor:
    """Index of the most cosine-similar key token for every query token.

    queries: (n, N, D) frames; keys: (A, M, D) anchor frames. Returns (A, n, N) indices into M,
    computed in slices of frames so the similarity matrix stays below `max_elements` entries.
    """
    q = torch.nn.functional.normalize(queries.float(), dim=-1)  # (n, N, D)
    k = torch.nn.functional.normalize(keys.float(), dim=-1)  # (A, M, D)
    if q.device.type == "cuda":
        # Unit vectors fit fp16 (cosines to ~1e-3, as the public code matches); its tensor-core matmul
        # accumulates in fp32 and is ~10x faster than an fp32 one, on half the memory.
        q, k = q.half(), k.half()
    n, tokens, _ = q.shape
    step = max(1, max_elements // max(1, tokens * k.shape[1]))
    out = torch.empty(k.shape[0], n, tokens, dtype=torch.long, device=q.device)
    for a in range(k.shape[0]):
        for s in range(0, n, step):
            sim = q[s : s + step] @ k[a].T  # (step, N, M)
            out[a, s : s + step] = sim.argmax(dim=-1)
    return out


def propagate(outputs: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Gather anchor tokens along correspondences and blend two anchors by per-frame weights.

    outputs: (B, A, M, D) stored attention outputs of A anchor keyframes (B branches); index:
    (A, n, N) source token -> anchor token; weights: (n,) weight of anchor 0 (A == 2) or None
    (A == 1). Returns (B, n, N, D).
    """
    b, a, _, dim = outputs.shape
    _, n, tokens = index.shape
    gathered = torch.gather(
        outputs,  # (B, A, M, D)
        2,
        index.reshape(1, a, n * tokens, 1).expand(b, a, n * tokens, dim),
    ).reshape(b, a, n, tokens, dim)  # (B, A, n, N, D)
    if a == 1:
        return gathered[:, 0]
    w = weights.to(gathered.device, gathered.dtype, non_blocking=True).view(1, n, 1, 1)
    return w * gathered[:, 0] + (1 - w) * gathered[:, 1]


def latent_index(token_index: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Carry token correspondences (A, n, N) on a site's grid to the (height, width) latent grid.

    A site's grid is the latent grid downsampled by an integer factor f (patch size, UNet level; a
    UNet's stride-2 convolutions round odd sides up, so a level's grid is ceil(side / 2^k)): the
    latent pixel at offset (dy, dx) inside token (y, x) goes to the same offset inside the matched
    token (clamped to the last latent row / column where the edge cuts that token off). Returns
    (A, n, height * width) indices into the latent pixels, row-major.
    """
    tokens = token_index.shape[-1]
    f = round(math.sqrt(height * width / tokens))
    if f < 1 or height % f or width % f or (height // f) * (width // f) != tokens:
        rounded_up = [2**k for k in range(1, max(height, width).bit_length() + 1)
                      if -(-height // 2**k) * -(-width // 2**k) == tokens]
        if not rounded_up:
            raise ValueError(f"{tokens} tokens are not a grid of the {height}x{width} latent")
        f = rounded_up[0]
    gw = -(-width // f)
    ys = torch.arange(height, device=token_index.device).view(-1, 1)
    xs = torch.arange(width, device=token_index.device).view(1, -1)
    own = ((ys // f) * gw + xs // f).reshape(-1)  # (h*w,) token of each latent pixel
    matched = token_index[..., own]  # (A, n, h*w)
    ty, tx = matched // gw, matched % gw
    y = (ty * f + ys.reshape(-1).repeat_interleave(width) % f).clamp_max(height - 1)
    x = (tx * f + xs.reshape(-1).repeat(height) % f).clamp_max(width - 1)
    return y * width + x


def blend_weights(frames: torch.Tensor, centre_a: float, centre_b: float) -> torch.Tensor:
    """TokenFlow's weight of anchor a: sigmoid(d_b / (d_a + d_b)), d = distance to each anchor's centre."""
    d_a = (frames.float() - centre_a).abs()
    d_b = (frames.float() - centre_b).abs()
    return torch.sigmoid(d_b / (d_a + d_b).clamp_min(1e-6))


# --------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------


def _copy_async(dst: torch.Tensor, src: torch.Tensor) -> None:
    # Device -> pinned host copies run on the stream without a host sync. Nothing reads the host
    # buffer on the CPU: it only goes back to the device, later on the same stream.
    dst.copy_(src, non_blocking=True)


def _fetch(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A contiguous stored slice on `device` (host -> device without a host sync)."""
    return t.to(device, non_blocking=True)


class TokenFlowAttnProcessor:
    """Self-attention processor implementing the TokenFlow passes for one site (see module docs)."""

    def __init__(self, site: str, state: TokenFlowState, ops: AttentionOps, original: Callable, pnp: bool):
        self.site = site
        self.state = state
        self.ops = ops
        self.original = original  # the processor this one stands in for, used in Pass.PLAIN
        self.pnp = pnp  # whether this site takes PnP query/key injection

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state = self.state
        if state.mode is Pass.PLAIN:
            return self.original(attn, hidden_states, *args, **kwargs)
        n = state.frames
        if hidden_states.shape[0] != NUM_BRANCHES * n:
            raise RuntimeError(
                f"{self.site}: batch of {hidden_states.shape[0]} does not hold {NUM_BRANCHES} branches of {n} frames"
            )
        if state.mode is Pass.PROPAGATE:
            p = float(state.propagation)
            record = state.record_index and (
                state.token_index is None or hidden_states.shape[1] >= state.token_index.shape[-1])
            if p <= 0.0:
                if record:
                    state.token_index = self._correspondences(hidden_states)
                return self._attention(attn, hidden_states, per_frame=True)
            out = self._propagate(hidden_states, record)
            if p < 1.0:
                own = self._attention(attn, hidden_states, per_frame=True)
                out = torch.lerp(own, out.to(own.dtype), p)
            return out
        out = self._attention(attn, hidden_states, per_frame=state.mode is not Pass.KEYFRAMES)  # (3n, N, D)
        if state.mode is Pass.KEYFRAMES:
            self._store(hidden_states[:n].detach(), out.detach().unflatten(0, (NUM_BRANCHES, n)))
        return out

    def _attention(self, attn: Any, hidden_states: torch.Tensor, per_frame: bool) -> torch.Tensor:
        """Self-attention output (3n, N, D): per frame, or extended over the call's frames (keyframes)."""
        n = self.state.frames
        q, k, v = self.ops.project(attn, hidden_states)  # (3n, h, N, d) each
        if self.pnp and self.state.inject_attention:
            q = torch.cat([q[:n]] * NUM_BRANCHES)
            k = torch.cat([k[:n], k[:n], k[:n]])
        if per_frame:
            o = self.ops.attend(attn, q, k, v)
        else:
            o = extended_attention(self.ops, attn, q, k, v, n)
        return self.ops.output(attn, o, hidden_states)  # (3n, N, D)

    def _store(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """Keep the keyframes' normalised inputs (n, N, D) and outputs (3, n, N, D) for propagation."""
        state = self.state
        n = inputs.shape[0]
        device = state.store_device or inputs.device
        slots = state.keyframe_slots or n
        if slots == n and device == inputs.device:
            state.keyframe_inputs[self.site] = inputs  # (K, N, D)
            state.keyframe_outputs[self.site] = outputs  # (3, K, N, D)
            return
        if state.keyframe_offset == 0:
            # One buffer per site for the step's keyframes; pinned when it is host memory of a GPU run,
            # so the copies below are asynchronous DMA.
            pin = device.type == "cpu" and inputs.device.type == "cuda"
            state.keyframe_inputs[self.site] = torch.empty(
                (slots, *inputs.shape[1:]), dtype=inputs.dtype, device=device, pin_memory=pin)  # (K, N, D)
            state.keyframe_outputs[self.site] = torch.empty(
                (NUM_BRANCHES, slots, *inputs.shape[1:]), dtype=outputs.dtype, device=device, pin_memory=pin)
        group = slice(state.keyframe_offset, state.keyframe_offset + n)
        _copy_async(state.keyframe_inputs[self.site][group], inputs)
        for b in range(NUM_BRANCHES):  # per branch, so every destination is one contiguous block
            _copy_async(state.keyframe_outputs[self.site][b, group], outputs[b])

    def _correspondences(self, x: torch.Tensor) -> torch.Tensor:
        """(A, n, N): for each token of the current frames, its token in each anchor keyframe."""
        state = self.state
        n = state.frames
        stored = state.keyframe_inputs[self.site]  # (K, N, D)
        # Anchors by Python index (no index tensor to upload, no host sync); each slice is contiguous.
        keys = torch.stack([_fetch(stored[a], x.device) for a in state.anchors])  # (A, N, D)
        if state.matcher is None:
            return nearest_tokens(x[:n], keys)
        return state.matcher(self.site, x[:n], keys)

    def _propagate(self, x: torch.Tensor, record: bool = False) -> torch.Tensor:
        state = self.state
        n = state.frames
        outs = state.keyframe_outputs[self.site]  # (3, K, N, D)
        index = self._correspondences(x)  # (A, n, N)
        if record:
            state.token_index = index
        outputs = torch.stack([
            torch.stack([_fetch(outs[b, a], x.device) for a in state.anchors]) for b in range(NUM_BRANCHES)
        ])  # (3, A, N, D)
        out = propagate(outputs, index, state.weights)  # (3, n, N, D)
        return out.reshape(NUM_BRANCHES * n, *out.shape[2:])
