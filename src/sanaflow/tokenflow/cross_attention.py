"""Prompt-to-Prompt cross-attention control (Hertz et al. 2022, word swap / refinement) for TokenFlow.

Why: PnP keeps the source video's structure through self-attention and residual features, but
which image region a *word* lands on is decided in cross-attention. A small model asked to turn
"a pink square and a purple cross" into "a green square and a purple cross" may bind the new
colour to the wrong object (the cross turns green). Prompt-to-Prompt keeps every word's spatial
map: during the first steps, the target branch's cross-attention probabilities are replaced by
the source branch's, token-aligned, so the swapped word takes the map of the word it replaces.

How: a `CrossAttentionControl` processor sits on every cross-attention site and reads the editor's
`TokenFlowState`. When ``state.inject_cross`` is off (or in `Pass.PLAIN`) it calls the site's
original processor. When on, for the three branches ``[source (n), negative (n), target (n)]``:
source and negative attend as usual; the target computes

    P_s = softmax(q_s k_s^T * scale + bias_s),  P_t = softmax(q_t k_t^T * scale + bias_t)   (float32)
    P_t[..., j] := P_s[..., map[j]]  where map[j] >= 0
    P_t[..., j] *= c_j          (Prompt-to-Prompt re-weighting: c = `--cross-reweight` at the edited words, 1 elsewhere)
    out_t = P_t @ v_t                                                     (the target's own values)

The re-weighting (no renormalisation, as in Prompt-to-Prompt's attention re-weighting) strengthens
the words that changed, which a small model's weak binding otherwise lets the source's words outvote.

`align_tokens` builds ``map`` (target caption position -> source position, or -1) from the token ids
of both prompts. The arithmetic of one cross-attention (projections, mask, output) belongs to the
backbone and comes in as a `CrossAttentionOps`, as `AttentionOps` does for self-attention.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .attention import NUM_BRANCHES, Pass, TokenFlowState


class CrossAttentionOps(Protocol):
    """The backbone's cross-attention arithmetic, split so the probabilities can be edited."""

    def project(
        self, attn: Any, x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """From the processor's call arguments: q (B, h, N, d), k, v (B, h, L, d), additive key bias or None.

        The bias broadcasts to (B, h, N, L) and has B rows (or one for all).
        """

    def scale(self, attn: Any, q: torch.Tensor) -> float:
        """The factor of q k^T in the softmax."""

    def output(self, attn: Any, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Output projection of o (B, h, N, d) -> (B, N, D) (x is the input, for residual settings)."""


# --------------------------------------------------------------------------------------------
# Pure functions (tested against direct implementations)
# --------------------------------------------------------------------------------------------


def _token_blocks(
    source_ids: Sequence[int],
    target_ids: Sequence[int],
    source_mask: Sequence[int] | None,
    target_mask: Sequence[int] | None,
) -> tuple[list[int], list[int], list[tuple[str, int, int, int, int]]]:
    """The unmasked source and target positions and difflib's opcodes over their ids (indices into those lists)."""
    src = [i for i in range(len(source_ids)) if source_mask is None or source_mask[i]]
    tgt = [j for j in range(len(target_ids)) if target_mask is None or target_mask[j]]
    a = [int(source_ids[i]) for i in src]
    b = [int(target_ids[j]) for j in tgt]
    # autojunk off: it would treat frequent ids (padding, "a") in sequences of 200+ as junk.
    return src, tgt, difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()


def align_tokens(
    source_ids: Sequence[int],
    target_ids: Sequence[int],
    source_mask: Sequence[int] | None = None,
    target_mask: Sequence[int] | None = None,
) -> list[int]:
    """Map every target caption position to the source position whose probability it takes, or -1.

    difflib's matching over the ids of the unmasked positions: 'equal' blocks map one to one,
    'replace' blocks of equal length position by position (the swapped words); insertions, deletions
    and replacements of unequal length give -1 (the target keeps its own probability there).
    Masked positions (mask 0) take no part: a masked target position maps to -1 and keeps its own
    probability, which the mask makes zero, and no unmasked target position maps to a masked source
    one; so masked keys stay masked and real ones stay real. Without masks every position counts
    (Stable Diffusion attends to its padding tokens too).
    """
    src, tgt, blocks = _token_blocks(source_ids, target_ids, source_mask, target_mask)
    out = [-1] * len(target_ids)
    for tag, i1, i2, j1, j2 in blocks:
        if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
            for k in range(j2 - j1):
                out[tgt[j1 + k]] = src[i1 + k]
    return out


def edited_positions(
    source_ids: Sequence[int],
    target_ids: Sequence[int],
    source_mask: Sequence[int] | None = None,
    target_mask: Sequence[int] | None = None,
) -> list[bool]:
    """Which target caption positions hold the edit: unmasked positions outside difflib's 'equal' blocks.

    Swapped words (replace blocks of any length) and inserted words count; positions equal to the
    source's, and masked ones, do not. Same matching as `align_tokens`.
    """
    _, tgt, blocks = _token_blocks(source_ids, target_ids, source_mask, target_mask)
    out = [False] * len(target_ids)
    for tag, _, _, j1, j2 in blocks:
        if tag != "equal":
            for k in range(j1, j2):
                out[tgt[k]] = True
    return out


def _probabilities(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) in float32: q (n, h, N, d), k (n, h, L, d) -> (n, h, N, L)."""
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale  # (n, h, N, L)
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1)


def controlled_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    token_map: torch.Tensor,
    frames: int,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-attention of the three branches with the target's probabilities taken from the source's.

    q (3n, h, N, d); k, v (3n, h, L, d) in branch-major order; bias None or additive, broadcastable
    to (3n, h, N, L) with 3n rows or one; token_map (L,) long (see `align_tokens`); token_weights
    None or (L,): factors of the target's probability columns after the swap (re-weighting). Returns
    (3n, h, N, d): source and negative as plain softmax attention (the source's probabilities in
    float32, as they are needed anyway), the target with swapped columns.
    """
    n = frames
    if token_map.shape != (k.shape[-2],):
        raise RuntimeError(
            f"the token map has {tuple(token_map.shape)} entries but the caption has {k.shape[-2]} tokens")

    def rows(t: torch.Tensor | None, part: slice) -> torch.Tensor | None:
        return t if t is None or t.shape[0] == 1 else t[part]

    source, negative, target = slice(0, n), slice(n, 2 * n), slice(2 * n, 3 * n)
    p_source = _probabilities(q[source], k[source], rows(bias, source), scale)  # (n, h, N, L)
    p_target = _probabilities(q[target], k[target], rows(bias, target), scale)  # (n, h, N, L)
    taken = p_source.index_select(-1, token_map.clamp_min(0))  # (n, h, N, L): column j is source map[j]
    probs = torch.where(token_map >= 0, taken, p_target)  # (n, h, N, L)
    if token_weights is not None:
        if token_weights.shape != token_map.shape:
            raise RuntimeError(f"the token weights have {tuple(token_weights.shape)} entries but the caption "
                               f"has {k.shape[-2]} tokens")
        probs = probs * token_weights.float()
    out_source = (p_source @ v[source].float()).to(v.dtype)  # (n, h, N, d)
    out_negative = F.scaled_dot_product_attention(q[negative], k[negative], v[negative],
                                                  attn_mask=rows(bias, negative), scale=scale)  # (n, h, N, d)
    out_target = (probs @ v[target].float()).to(v.dtype)  # (n, h, N, d): the target's own values
    return torch.cat([out_source, out_negative, out_target])


# --------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------


class CrossAttentionControl:
    """Cross-attention processor applying Prompt-to-Prompt control when the state asks (see module docs)."""

    def __init__(self, site: str, state: TokenFlowState, ops: CrossAttentionOps, original: Callable):
        self.site = site
        self.state = state
        self.ops = ops
        self.original = original  # the processor this one stands in for, used whenever the control is off

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state = self.state
        if state.mode is Pass.PLAIN or not state.inject_cross:
            return self.original(attn, hidden_states, *args, **kwargs)
        if state.token_map is None:
            raise RuntimeError(f"{self.site}: cross-attention control is on but the state holds no token map")
        n = state.frames
        if hidden_states.shape[0] != NUM_BRANCHES * n:
            raise RuntimeError(
                f"{self.site}: batch of {hidden_states.shape[0]} does not hold {NUM_BRANCHES} branches of {n} frames"
            )
        q, k, v, bias = self.ops.project(attn, hidden_states, *args, **kwargs)  # (3n, h, N|L, d), bias
        o = controlled_cross_attention(q, k, v, bias, self.ops.scale(attn, q), state.token_map, n,
                                       state.token_weights)
        return self.ops.output(attn, o, hidden_states)  # (3n, N, D)
