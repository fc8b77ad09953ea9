"""SanaTransformer: parity with diffusers' SanaTransformer2DModel through the user's load path, and behaviour."""

from __future__ import annotations

import json

import pytest
import torch

from sanaflow.errors import ConfigError, InputError, SanaflowError
from sanaflow.models import SanaTransformer
from sanaflow.models.sana_transformer import (
    CrossAttnProcessor,
    IdentitySelfAttnProcessor,
    LinearSelfAttnProcessor,
    SanaTransformerBlock,
    SelfAttnProcessor,
    SoftmaxCrossAttnProcessor,
)
from sanaflow.ops import norm as norm_ops
from sanaflow.ops.linear_attention import linear_attention

diffusers = pytest.importorskip("diffusers")

TINY = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=3,
    num_cross_attention_heads=2,
    cross_attention_head_dim=8,
    cross_attention_dim=16,
    caption_channels=12,
    sample_size=8,
)
CAPTION_LEN = 6


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter (norm scales and modulation tables included) with random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:  # RMS/LayerNorm scales: around 1, but clearly not 1
                p.copy_(1.0 + 0.3 * noise)
            elif "scale_shift_table" in name or p.ndim == 1:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise * (0.7 / p[0].numel() ** 0.5))


def _diffusers_model(tmp_path, seed=1, **overrides):
    """A randomised diffusers SanaTransformer2DModel saved to tmp_path, and its folder."""
    ref = diffusers.SanaTransformer2DModel(**{**TINY, **overrides}).eval()
    _randomise(ref, seed)
    folder = tmp_path / "transformer"
    ref.save_pretrained(folder)
    return ref, folder


def _inputs(batch=2, height=8, width=8, channels=4, seed=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=gen)
    caption = torch.randn(batch, CAPTION_LEN, TINY["caption_channels"], generator=gen)
    t = torch.tensor([700.0, 35.0])[:batch]
    return x, caption, t


CASES = {
    "plain": (dict(), dict(), (8, 8)),
    "sprint_qknorm_guidance": (
        dict(qk_norm="rms_norm_across_heads", guidance_embeds=True, timestep_scale=1000.0, out_channels=None),
        dict(guidance=torch.tensor([0.45, 0.3])),
        (8, 8),
    ),
    "pe_base_grid": (dict(interpolation_scale=2), dict(), (8, 8)),
    "pe_other_grid": (dict(interpolation_scale=2), dict(), (6, 10)),
    # the official 2K / 4K configs store interpolation_scale as a float (1.0 / 2.0), others as 0.5, 1.5
    "pe_float_scale": (dict(interpolation_scale=2.0), dict(), (6, 10)),
    "pe_fractional_scale": (dict(interpolation_scale=1.5), dict(), (8, 8)),
    "patch2": (dict(patch_size=2), dict(), (8, 12)),
    "patch2_pe": (dict(patch_size=2, interpolation_scale=1), dict(), (12, 8)),
    "padded_mask": (
        dict(),
        dict(encoder_attention_mask=torch.tensor([[1.0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])),
        (8, 8),
    ),
    "affine_norm_bias": (dict(norm_elementwise_affine=True, attention_bias=True), dict(), (8, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_diffusers(tmp_path, case):
    overrides, kwargs, (height, width) = CASES[case]
    ref, folder = _diffusers_model(tmp_path, **overrides)
    ours = SanaTransformer.from_pretrained(folder)

    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    assert all(our_sd[k].shape == ref_sd[k].shape for k in ref_sd)

    x, caption, t = _inputs(height=height, width=width)
    with torch.no_grad():
        expected = ref(x, caption, t, return_dict=False, **kwargs)[0]
        got = ours(x, caption, t, **kwargs)
    assert got.shape == expected.shape == (2, ours.out_channels, height, width)
    assert expected.abs().max() > 0.5  # a meaningful signal, not a near-zero output
    assert (got - expected).abs().max().item() <= 1e-4


def test_config_keys_match_diffusers(tmp_path):
    ref, folder = _diffusers_model(tmp_path, qk_norm="rms_norm_across_heads", guidance_embeds=True)
    ours = SanaTransformer.from_pretrained(folder)
    ref_config = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert set(ours.config) == set(ref_config)
    saved = json.loads(ours.save_pretrained(tmp_path / "ours").joinpath("config.json").read_text())
    assert saved["_class_name"] == "SanaTransformer2DModel"
    assert {k: v for k, v in saved.items() if not k.startswith("_")} == json.loads(json.dumps(ref_config))


def test_padded_caption_tokens_are_ignored(tmp_path):
    _, folder = _diffusers_model(tmp_path)
    model = SanaTransformer.from_pretrained(folder)
    x, caption, t = _inputs()
    mask = torch.tensor([[True, True, True, False, False, False], [True] * 6])
    changed = caption.clone()
    changed[0, 3:] = 100.0 * torch.randn(3, caption.shape[-1])  # garbage in the padded positions
    with torch.no_grad():
        masked = model(x, caption, t, encoder_attention_mask=mask)
        masked_changed = model(x, changed, t, encoder_attention_mask=mask)
        unmasked = model(x, caption, t)
    assert torch.allclose(masked, masked_changed, atol=1e-5)
    assert (masked[0] - unmasked[0]).abs().max() > 1e-2  # the mask does act on sample 0
    assert torch.allclose(masked[1], unmasked[1], atol=1e-5)  # sample 1 has no padding


def test_controlnet_block_samples_match_diffusers(tmp_path):
    ref, folder = _diffusers_model(tmp_path)
    ours = SanaTransformer.from_pretrained(folder)
    x, caption, t = _inputs()
    samples = tuple(torch.randn(2, 64, 16) for _ in range(2))
    with torch.no_grad():
        expected = ref(x, caption, t, controlnet_block_samples=samples, return_dict=False)[0]
        got = ours(x, caption, t, controlnet_block_samples=samples)
    assert (got - expected).abs().max().item() <= 1e-4


def test_save_load_round_trip(tmp_path):
    _, folder = _diffusers_model(tmp_path, qk_norm="rms_norm_across_heads", interpolation_scale=2)
    model = SanaTransformer.from_pretrained(folder)
    again = SanaTransformer.from_pretrained(model.save_pretrained(tmp_path / "ours"))
    assert again.config == model.config
    x, caption, t = _inputs(height=6, width=10)
    with torch.no_grad():
        assert torch.equal(model(x, caption, t), again(x, caption, t))
    assert model.patch_embed.pos_embed is not None and not again.patch_embed.pos_embed.is_meta


def test_scalar_timestep_broadcasts(tmp_path):
    _, folder = _diffusers_model(tmp_path)
    model = SanaTransformer.from_pretrained(folder)
    x, caption, _ = _inputs()
    with torch.no_grad():
        a = model(x, caption, 250.0)
        b = model(x, caption, torch.tensor([250.0, 250.0]))
    assert torch.equal(a, b)
    with pytest.raises(InputError, match="timestep"):
        model(x, caption, torch.tensor([1.0, 2.0, 3.0]))


def _count_saved_tensors(fn) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count


def test_gradient_checkpointing_same_gradients(tmp_path):
    _, folder = _diffusers_model(tmp_path, qk_norm="rms_norm_across_heads")
    model = SanaTransformer.from_pretrained(folder).train()
    x, caption, t = _inputs()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])

    def grads(checkpointing: bool):
        model.enable_gradient_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        saved = _count_saved_tensors(
            lambda: model(x, caption, t, encoder_attention_mask=mask).square().mean().backward()
        )
        return {n: p.grad.clone() for n, p in model.named_parameters()}, saved

    plain, saved_plain = grads(False)
    ckpt, saved_ckpt = grads(True)
    assert saved_ckpt < saved_plain / 2  # the blocks' activations really are recomputed, not stored
    assert set(plain) == set(ckpt)
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], rtol=1e-5, atol=1e-7), name
    assert any(g.abs().max() > 0 for g in plain.values())


def test_wrong_latent_channels_is_a_clear_error(tmp_path):
    _, folder = _diffusers_model(tmp_path)
    model = SanaTransformer.from_pretrained(folder)
    x, caption, t = _inputs(channels=3)
    with pytest.raises(SanaflowError, match=r"3 channels.*in_channels=4"):
        model(x, caption, t)
    x, caption, t = _inputs()
    with pytest.raises(InputError, match="caption_channels=12"):
        model(x, caption[..., :8], t)
    with pytest.raises(InputError, match="guidance_embeds=False"):
        model(x, caption, t, guidance=torch.tensor([0.1, 0.1]))


def test_optional_arguments_are_keyword_only(tmp_path):
    # diffusers' 4th positional argument is `guidance`; a positional 4th argument must not pass as the mask
    _, folder = _diffusers_model(tmp_path)
    model = SanaTransformer.from_pretrained(folder)
    x, caption, t = _inputs()
    with pytest.raises(TypeError):
        model(x, caption, t, torch.ones(2, caption.shape[1]))


def test_unknown_qk_norm_is_a_config_error():
    with pytest.raises(ConfigError, match="rms_norm_across_heads"):
        SanaTransformer(**TINY, qk_norm="rms_norm_per_head")


def test_attention_processors_swap_and_restore(tmp_path):
    _, folder = _diffusers_model(tmp_path)
    model = SanaTransformer.from_pretrained(folder)
    x, caption, t = _inputs()
    procs = model.attn_processors
    assert list(procs) == [f"transformer_blocks.{i}.attn{j}" for i in range(3) for j in (1, 2)]
    assert isinstance(procs["transformer_blocks.0.attn1"], LinearSelfAttnProcessor)
    assert isinstance(procs["transformer_blocks.0.attn2"], SoftmaxCrossAttnProcessor)

    with torch.no_grad():
        base = model(x, caption, t)
        model.set_attn_processor(IdentitySelfAttnProcessor())  # every attn1; attn2 untouched
        assert isinstance(model.attn_processors["transformer_blocks.2.attn2"], SoftmaxCrossAttnProcessor)
        identity_all = model(x, caption, t)
        model.set_attn_processor(procs)
        restored = model(x, caption, t)
        model.set_attn_processor({"transformer_blocks.1.attn1": IdentitySelfAttnProcessor()})
        identity_one = model(x, caption, t)
        model.set_default_attn_processor()
        restored_default = model(x, caption, t)
    assert (identity_all - base).abs().max() > 1e-2
    assert (identity_one - base).abs().max() > 1e-2
    assert (identity_one - identity_all).abs().max() > 1e-2
    assert torch.equal(restored, base)
    assert torch.equal(restored_default, base)

    with pytest.raises(ConfigError, match="did you mean 'transformer_blocks.1.attn1'"):
        model.set_attn_processor({"transformer_blocks.1.atn1": IdentitySelfAttnProcessor()})
    with pytest.raises(ConfigError, match="SelfAttnProcessor"):
        model.set_attn_processor({"transformer_blocks.0.attn1": SoftmaxCrossAttnProcessor()})
    with pytest.raises(ConfigError, match="CrossAttnProcessor"):
        model.set_attn_processor({"transformer_blocks.0.attn2": LinearSelfAttnProcessor()})


def test_identity_processor_matches_diffusers_pag(tmp_path):
    """Our identity self-attention equals the perturbed half of diffusers' PAG identity processor."""
    from diffusers.models.attention_processor import PAGIdentitySanaLinearAttnProcessor2_0

    ref, folder = _diffusers_model(tmp_path)
    ours = SanaTransformer.from_pretrained(folder)
    layers = {"transformer_blocks.0.attn1", "transformer_blocks.2.attn1"}
    ours.set_attn_processor(dict.fromkeys(layers, IdentitySelfAttnProcessor()))
    for name, module in ref.named_modules():
        if name in layers:
            module.set_processor(PAGIdentitySanaLinearAttnProcessor2_0())
    x, caption, t = _inputs()
    with torch.no_grad():  # diffusers runs [original, perturbed] as one batch of 2B
        expected = ref(x.repeat(2, 1, 1, 1), caption.repeat(2, 1, 1), t.repeat(2), return_dict=False)[0][2:]
        got = ours(x, caption, t)
    assert (got - expected).abs().max().item() <= 1e-4


class _RecordingProcessor(SelfAttnProcessor):
    """A custom processor: records the grid size it is given, then computes the default math."""

    def __init__(self):
        self.seen: list[tuple[tuple[int, ...], int, int]] = []

    def __call__(self, attn, hidden_states, height, width):
        self.seen.append((tuple(hidden_states.shape), height, width))
        q, k, v = attn.project_qkv(hidden_states)
        return attn.project_out(linear_attention(q, k, v).transpose(1, 2).flatten(2))


def test_custom_processor_gets_grid_and_reproduces_default(tmp_path):
    _, folder = _diffusers_model(tmp_path, patch_size=2)
    model = SanaTransformer.from_pretrained(folder)
    x, caption, t = _inputs(height=8, width=12)
    recorder = _RecordingProcessor()
    with torch.no_grad():
        base = model(x, caption, t)
        model.set_attn_processor(recorder)
        custom = model(x, caption, t)
    assert recorder.seen == [((2, 24, 16), 4, 6)] * 3
    assert torch.equal(custom, base)
    assert not isinstance(recorder, CrossAttnProcessor)


def test_low_precision_forward_on_cpu(tmp_path):
    _, folder = _diffusers_model(tmp_path, qk_norm="rms_norm_across_heads", interpolation_scale=2)
    full = SanaTransformer.from_pretrained(folder)
    x, caption, t = _inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = full(x, caption, t, encoder_attention_mask=mask)
        for dtype in (torch.bfloat16, torch.float16):
            model = SanaTransformer.from_pretrained(folder, torch_dtype=dtype)
            assert model.proj_out.weight.dtype == dtype
            out = model(x.to(dtype), caption.to(dtype), t, encoder_attention_mask=mask)
            assert out.dtype == dtype
            assert torch.isfinite(out).all()
            err = (out.float() - expected).abs().max() / expected.abs().max()
            assert err < 0.1, (dtype, err)


def test_linear_attention_matches_quadratic_form():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 10, 4, generator=gen).abs()  # positive: every query has a nonzero normaliser
    k = torch.randn(2, 3, 7, 4, generator=gen)  # keys/values may come from another token set (M != N)
    v = torch.randn(2, 3, 7, 4, generator=gen)
    scores = torch.relu(q) @ torch.relu(k).transpose(-1, -2)  # (B, h, N, M)
    expected = (scores @ v) / scores.sum(-1, keepdim=True)
    got = linear_attention(q, k, v)
    assert got.shape == (2, 3, 10, 4)
    assert torch.allclose(got, expected, atol=1e-5)
    half = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), expected, atol=0.1)
    # a query with no positive feature gets 0, not NaN
    assert torch.equal(linear_attention(-q.abs(), k, v), torch.zeros_like(q))


def _mix_ffn_conv_reference(ff, grid: torch.Tensor) -> torch.Tensor:
    # The Mix-FFN written as diffusers' GLUMBConv does it, on the (B, D, H, W) grid.
    h = ff.conv_depth(torch.nn.functional.silu(ff.conv_inverted(grid)))  # (B, 2h, H, W)
    h, gate = h.chunk(2, dim=1)
    return ff.conv_point(h * torch.nn.functional.silu(gate))  # (B, D, H, W)


def test_mix_ffn_token_path_matches_conv_grid_path():
    from sanaflow.models.sana_transformer import GLUMBConv
    from sanaflow.quant.layers import Int8WeightOnlyLinear

    torch.manual_seed(0)
    ff = GLUMBConv(16, 2.5)
    grid = torch.randn(2, 16, 5, 7)  # non-square: catches a swapped height/width
    tokens = grid.flatten(2).transpose(1, 2).contiguous()  # (B, N, D) row-major, as the block holds them
    with torch.no_grad():
        expected = _mix_ffn_conv_reference(ff, grid)
        got = ff.forward_tokens(tokens, 5, 7)  # (B, N, D)
        assert got.shape == (2, 35, 16)
        assert (got - expected.flatten(2).transpose(1, 2)).abs().max().item() <= 1e-5
        assert (ff(grid) - expected).abs().max().item() <= 1e-5  # the grid API is kept
        # A quantized replacement of a 1x1 conv takes the grid; the token path must still feed it right.
        ff.conv_inverted = Int8WeightOnlyLinear.from_float(ff.conv_inverted)
        ff.conv_point = Int8WeightOnlyLinear.from_float(ff.conv_point)
        expected_q = _mix_ffn_conv_reference(ff, grid)
        got_q = ff.forward_tokens(tokens, 5, 7)
        assert (got_q - expected_q.flatten(2).transpose(1, 2)).abs().max().item() <= 1e-5


def test_block_does_not_modify_its_input(tmp_path):
    _, folder = _diffusers_model(tmp_path)
    model = SanaTransformer.from_pretrained(folder).eval()
    block = model.transformer_blocks[0]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, 16, generator=gen)  # (B, N = 3 * 4, D)
    context = torch.randn(2, CAPTION_LEN, 16, generator=gen)
    modulation = torch.randn(2, 6 * 16, generator=gen)
    before = x.clone()
    with torch.no_grad():
        out = block(x, context, None, modulation, 3, 4)
    assert out.shape == x.shape
    assert torch.equal(x, before)  # hooks and callers may hold the block input


# ----------------------------------------------------------------------------------------------
# Deferred block residuals: in inference each block's last gated residual is added in the next
# block's norm1 pass (SanaTransformer.forward). On CPU the row kernels do not run, so the tests force
# the loop (`defer_on_cpu`) and the norms take the torch path: the same ops in another place.
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def defer_on_cpu(monkeypatch):
    monkeypatch.setattr(norm_ops, "row_kernels_run", lambda x: True)


def _spy_deferral(monkeypatch) -> list[bool]:
    """The `defer_residual` flag of every block call (a spy on the class, not a hook: hooks stop the deferral)."""
    flags = []
    forward = SanaTransformerBlock.forward

    def spied(self, *args, defer_residual=False, **kwargs):
        flags.append(defer_residual)
        return forward(self, *args, defer_residual=defer_residual, **kwargs)

    monkeypatch.setattr(SanaTransformerBlock, "forward", spied)
    return flags


def _tiny(dtype=torch.float32, **overrides) -> SanaTransformer:
    model = SanaTransformer(**{**TINY, **overrides}).eval()
    _randomise(model, 3)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deferred_block_residuals_give_the_same_output(defer_on_cpu, monkeypatch, dtype):
    model = _tiny(dtype)
    x, caption, t = _inputs()
    x, caption = x.to(dtype), caption.to(dtype)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    flags = _spy_deferral(monkeypatch)
    with torch.no_grad():
        deferred = model(x, caption, t, encoder_attention_mask=mask)
        assert flags == [True] * 3
        with monkeypatch.context() as m:
            m.setattr(SanaTransformer, "_defers_block_residuals", lambda self, x, samples: False)
            plain = model(x, caption, t, encoder_attention_mask=mask)
    assert flags == [True] * 3 + [False] * 3
    assert torch.equal(deferred, plain)  # addcmul moved into the next block's norm: the same bits


def test_a_block_with_a_deferred_residual_matches_its_plain_call():
    model = _tiny()
    block = model.transformer_blocks[1]
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(2, 12, 16, generator=gen), torch.randn(2, 12, 16, generator=gen)
    gate = torch.randn(2, 1, 16, generator=gen)
    context = torch.randn(2, CAPTION_LEN, 16, generator=gen)
    modulation = torch.randn(2, 6 * 16, generator=gen)
    with torch.no_grad():
        plain = block(torch.addcmul(x, gate, y), context, None, modulation, 3, 4)
        x_new, (gate_mlp, ff_out) = block(x, context, None, modulation, 3, 4, residual=(gate, y), defer_residual=True)
    # the stream before the block's last step, and that step: the block's output once added
    assert x_new.shape == ff_out.shape == (2, 12, 16) and gate_mlp.shape == (2, 1, 16)
    assert torch.equal(torch.addcmul(x_new, gate_mlp, ff_out), plain)


def test_block_residuals_are_not_deferred_when_something_could_see_block_outputs(defer_on_cpu, monkeypatch):
    with torch.no_grad():  # inference: where the deferral may happen
        _check_deferral_conditions(monkeypatch)


def _check_deferral_conditions(monkeypatch):
    from sanaflow.pipelines.acceleration import compile_module

    model = _tiny()
    x, caption, t = _inputs()
    tokens = model.patch_embed(x)  # what the predicate is asked about
    assert model._defers_block_residuals(tokens, None)
    assert not model._defers_block_residuals(tokens, [torch.zeros(2, 64, 16)])  # ControlNet adds to outputs
    with torch.enable_grad():
        assert not model._defers_block_residuals(tokens, None)  # training, checkpointing
    with monkeypatch.context() as m:
        m.setattr(norm_ops, "row_kernels_run", lambda x: False)  # no kernel: nothing to save
        assert not model._defers_block_residuals(tokens, None)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: None)
    try:
        assert not model._defers_block_residuals(tokens, None)  # a hook on every module sees the blocks'
    finally:
        handle.remove()

    # hooks inside a block (TokenFlow's on the Mix-FFN, probes) see what they always do: still deferred
    seen = []
    model.transformer_blocks[1].ff.register_forward_hook(lambda m, args, out: seen.append(out))
    assert model._defers_block_residuals(tokens, None)
    # a hook on a block: its real output, the plain loop
    outputs = []
    model.transformer_blocks[1].register_forward_hook(lambda m, args, out: outputs.append(out))
    assert not model._defers_block_residuals(tokens, None)
    flags = _spy_deferral(monkeypatch)
    got = model(x, caption, t)
    with monkeypatch.context() as m:
        m.setattr(norm_ops, "row_kernels_run", lambda x: False)
        plain = model(x, caption, t)
    assert flags == [False] * 6 and isinstance(outputs[0], torch.Tensor)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(got, plain)
    assert torch.equal(seen[0], seen[1])

    # regional compilation: a hook on the compiled wrapper or on the block it holds
    free = _tiny()
    compiled = compile_module(free, backend="eager", regional=True)
    assert compiled._defers_block_residuals(tokens, None)
    handle = compiled.transformer_blocks[0].register_forward_pre_hook(lambda m, args: None)
    assert not compiled._defers_block_residuals(tokens, None)
    handle.remove()
    free.transformer_blocks[2].register_forward_pre_hook(lambda m, args: None)
    assert not compiled._defers_block_residuals(tokens, None)


def test_deferred_block_residuals_compile(defer_on_cpu, monkeypatch):
    from sanaflow.pipelines.acceleration import compile_module

    torch._dynamo.reset()
    model = _tiny()
    x, caption, t = _inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    counters = torch._dynamo.utils.counters
    try:
        with torch.no_grad():
            eager = model(x, caption, t, encoder_attention_mask=mask)
            whole = torch.compile(model, fullgraph=True, backend="eager")(x, caption, t, encoder_attention_mask=mask)
            before = counters["stats"]["unique_graphs"]
            regional = compile_module(model, backend="eager", regional=True)(x, caption, t, encoder_attention_mask=mask)
            # two block graphs: the first block (no residual handed in) and the others, which share one
            assert counters["stats"]["unique_graphs"] - before == 2
    finally:
        torch._dynamo.reset()
    assert torch.equal(whole, eager) and torch.equal(regional, eager)


def test_submodule_calls_skip_dispatch_only_when_nothing_would_see_it():
    """`_call` enters forward directly only with no hooks of any kind, no module.compile() and no jit trace."""
    from sanaflow.models.sana_transformer import _call

    model = _tiny()
    x, caption, t = _inputs()
    block = model.transformer_blocks[0]
    calls = []
    real_call = torch.nn.Module.__call__

    def counting(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return real_call(self, *args, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as m:
        m.setattr(torch.nn.Module, "__call__", counting)
        plain = model(x, caption, t)
        direct = len(calls)
        # the blocks' attentions, Mix-FFNs, dropouts, qk-norms and projections skip it
        assert not {"SanaSelfAttention", "SanaCrossAttention", "GLUMBConv", "Dropout", "Identity"} & set(calls)
        linears = calls.count("Linear")  # outside the blocks (timestep MLP, caption projection, ...)
        calls.clear()
        # a forward hook, a pre-hook, a backward hook, a global hook: each module keeps its __call__
        seen = []
        handles = [block.attn1.to_q.register_forward_hook(lambda mod, a, out: seen.append("to_q")),
                   block.ff.register_forward_pre_hook(lambda mod, a: seen.append("ff")),
                   block.attn2.to_v.register_full_backward_hook(lambda mod, gi, go: None)]
        hooked = model(x, caption, t)
        assert seen == ["to_q", "ff"] and calls.count("Linear") == linears + 2 and calls.count("GLUMBConv") == 1
        for h in handles:
            h.remove()
        calls.clear()
        names = []
        g = torch.nn.modules.module.register_module_forward_hook(lambda mod, a, out: names.append(type(mod).__name__))
        try:
            model(x, caption, t)
        finally:
            g.remove()
        assert names.count("Linear") >= 4 * TINY["num_layers"] and len(calls) > direct
    assert torch.equal(plain, hooked)
    # a hook that changes the output still changes it
    h = block.attn1.to_out[0].register_forward_hook(lambda mod, a, out: out * 0)
    with torch.no_grad():
        changed = model(x, caption, t)
    h.remove()
    assert not torch.allclose(changed, plain)
    # module.compile() (regional compilation) is honoured: the compiled call, not forward
    lin = torch.nn.Linear(4, 4)
    lin.compile(backend="eager")
    assert lin._compiled_call_impl is not None
    lin._compiled_call_impl = lambda *a: "compiled call"  # what module.compile() routes __call__ to
    assert _call(lin, torch.zeros(1, 4)) == "compiled call"
    assert torch.equal(_call(torch.nn.Identity(), t), t)
