"""INT8 / FP8 quantization of the SANA transformer: accuracy, save/load, CLI, errors.

The fp8 block wiring (norms and the residual add handing fp8 layers quantized rows) runs on the CPU
with torch's CPU ``_scaled_mm`` standing in for the GPU's (the fp8 device check patched, `cpu_fp8`);
the kernels themselves are checked in tests/test_ops_norm.py.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import sanaflow.models.sana_transformer as st
import sanaflow.quant as quant
import sanaflow.quant.layers as layers
from sanaflow.cli import main
from sanaflow.errors import CheckpointError, ConfigError, InputError, SanaflowError
from sanaflow.models.sana_transformer import (
    LinearSelfAttnProcessor,
    SanaTransformer,
    SoftmaxCrossAttnProcessor,
)
from sanaflow.ops import norm as norm_ops
from sanaflow.quant import (
    HIGH_PRECISION_MODULES,
    Fp8Linear,
    Int8WeightOnlyLinear,
    is_quantized,
    quantizable_modules,
    quantize_transformer,
    save_quantized,
)
from sanaflow.quant.layers import (
    Fp8Rows,
    accepts_fp8_rows,
    fp8_linear,
    int8_linear,
    quantize_fp8_rows,
    quantize_int8_rows,
)

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=16,
            mlp_ratio=2.5, sample_size=8)


def tiny_model(seed: int = 0) -> SanaTransformer:
    torch.manual_seed(seed)
    model = SanaTransformer(**TINY).eval()
    with torch.no_grad():  # non-trivial weights everywhere (default inits leave zero tables)
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


def tiny_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)  # (B, C, H, W) latents
    caption = torch.randn(2, 5, 16, generator=g)  # (B, L, caption_channels)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return x, caption, torch.tensor([500.0, 20.0]), mask


def run(model, inputs):
    x, caption, t, mask = inputs
    with torch.no_grad():
        return model(x, caption, t, encoder_attention_mask=mask)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def test_int8_model_close_to_float():
    model = tiny_model()
    inputs = tiny_inputs()
    ref = run(model, inputs)
    quantize_transformer(model, "int8")
    out = run(model, inputs)
    assert is_quantized(model) == "int8"
    assert cosine(out, ref) >= 0.99
    assert not torch.equal(out, ref)  # something was quantized


def test_only_blocks_linears_and_pointwise_convs_are_quantized():
    model = tiny_model()
    names = quantizable_modules(model, "int8")
    per_block = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "ff.conv_inverted", "ff.conv_point"}
    assert set(names) == {f"transformer_blocks.{i}.{n}" for i in range(2) for n in per_block}
    quantize_transformer(model, "int8")
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in HIGH_PRECISION_MODULES):
            assert not isinstance(module, Int8WeightOnlyLinear), name
    assert isinstance(model.transformer_blocks[0].ff.conv_depth, torch.nn.Conv2d)  # depthwise stays float
    assert model.transformer_blocks[0].ff.conv_inverted.weight.dtype == torch.int8
    # int8 weights take a quarter of the float32 bytes
    assert model.transformer_blocks[0].ff.conv_inverted.weight.element_size() == 1


def test_int8_rows_round_trip_error_is_bounded():
    w = torch.randn(64, 48)
    q, scale = quantize_int8_rows(w)
    err = (q.float() * scale[:, None] - w).abs().amax(dim=1)
    assert torch.all(err <= scale / 2 + 1e-7)  # rounding: at most half a step per row
    assert q.abs().max() <= 127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_features", [24, 64])
def test_int8_linear_matches_dequantised_weights(dtype, in_features):
    w = torch.randn(40, in_features) * 0.1
    x = torch.randn(3, 7, in_features).to(dtype)
    bias = torch.randn(40)
    q, scale = quantize_int8_rows(w)
    out = int8_linear(x, q, scale, bias)
    ref = F.linear(x.float(), q.float() * scale[:, None], bias)
    assert out.dtype == dtype and out.shape == (3, 7, 40)
    assert cosine(out, ref) > 0.9999


def test_fp8_linear_math_on_cpu_if_supported():
    w = torch.randn(48, 64) * 0.1
    x = torch.randn(2, 10, 64).bfloat16()
    bias = torch.randn(48).bfloat16()
    q, scale = quantize_fp8_rows(w)
    try:
        out = fp8_linear(x, q, scale[:, 0], bias)
    except (RuntimeError, NotImplementedError) as e:  # older torch: no CPU _scaled_mm
        pytest.skip(f"torch._scaled_mm unavailable on CPU: {e}")
    ref = F.linear(x.float(), w, bias.float())
    assert out.dtype == torch.bfloat16 and out.shape == (2, 10, 48)
    assert cosine(out, ref) >= 0.99


def test_fp8_on_cpu_is_a_sanaflow_error():
    model = tiny_model()
    with pytest.raises(SanaflowError, match="fp8"):
        quantize_transformer(model, "fp8")
    assert is_quantized(model) is None  # nothing was changed


def test_unknown_mode_and_double_quantization_are_errors():
    model = tiny_model()
    with pytest.raises(ConfigError, match="int8"):
        quantize_transformer(model, "int4")
    quantize_transformer(model, "int8")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_transformer(model, "int8")


def test_save_load_round_trip_identical(tmp_path):
    model = quantize_transformer(tiny_model(), "int8")
    inputs = tiny_inputs()
    out = run(model, inputs)
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    entry = config["_sanaflow_quantization"]
    assert entry["mode"] == "int8" and len(entry["layers"]) == 20
    loaded = SanaTransformer.from_pretrained(tmp_path / "q")  # the marker routes to the quantized loader
    assert is_quantized(loaded) == "int8"
    assert loaded.transformer_blocks[1].attn1.to_q.weight.dtype == torch.int8
    assert torch.equal(run(loaded, inputs), out)
    # model.to(dtype) must not cast the int8 weight or its float32 scales
    loaded.to(torch.bfloat16)
    layer = loaded.transformer_blocks[0].ff.conv_point
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert layer.bias is None and loaded.proj_out.weight.dtype == torch.bfloat16


def test_fp8_module_state_survives_dtype_casts():
    layer = Fp8Linear.from_float(torch.nn.Linear(32, 16))
    weight = layer.weight.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight.view(torch.uint8), weight.view(torch.uint8))
    assert layer.bias.dtype == torch.bfloat16
    with pytest.raises(InputError, match="CUDA"):
        layer(torch.randn(2, 32).bfloat16())


def test_corrupt_quantized_folder_is_a_checkpoint_error(tmp_path):
    save_quantized(quantize_transformer(tiny_model(), "int8"), tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    config["_sanaflow_quantization"]["layers"]["transformer_blocks.0.nope"] = "linear"
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="nope"):
        SanaTransformer.from_pretrained(tmp_path / "q")


def test_cli_quantize_transformer_and_pipeline(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from tiny_sana import save_tiny_sana

    src = save_tiny_sana(tmp_path / "pipe")
    float_model = SanaTransformer.from_pretrained(src, subfolder="transformer")
    g = torch.Generator().manual_seed(3)
    x, caption = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 16, generator=g)
    with torch.no_grad():
        ref = float_model(x, caption, torch.tensor([999.0, 10.0]))

    assert main(["quantize", str(src), "--mode", "int8", "--out", str(tmp_path / "q"), "--device", "cpu"]) == 0
    out_dir = tmp_path / "q"
    assert (out_dir / "model_index.json").is_file() and (out_dir / "vae").is_dir()
    assert (out_dir / "text_encoder").is_dir() and (out_dir / "scheduler").is_dir()
    model = SanaTransformer.from_pretrained(out_dir, subfolder="transformer")
    assert is_quantized(model) == "int8"
    with torch.no_grad():
        out = model(x, caption, torch.tensor([999.0, 10.0]))
    assert cosine(out, ref) >= 0.99

    # the quantized folder is a drop-in model for the text-to-image pipeline
    from sanaflow.pipelines.text_to_image import TextToImagePipeline

    kw = dict(seed=0, num_inference_steps=3, output_type="pt", height=64, width=64)
    images = TextToImagePipeline.from_pretrained(str(out_dir), device="cpu")("a red cat", **kw).images
    ref_images = TextToImagePipeline.from_pretrained(str(src), device="cpu")("a red cat", **kw).images
    assert is_quantized(TextToImagePipeline.from_pretrained(str(out_dir), device="cpu").transformer) == "int8"
    assert cosine(images, ref_images) >= 0.99

    # a transformer folder alone works too
    assert main(["quantize", str(src / "transformer"), "--mode", "int8", "--out", str(tmp_path / "t"),
                 "--device", "cpu"]) == 0
    assert is_quantized(SanaTransformer.from_pretrained(tmp_path / "t")) == "int8"

    # errors: one line, exit 2
    capsys.readouterr()
    assert main(["quantize", str(src), "--mode", "fp8", "--out", str(tmp_path / "f"), "--device", "cpu"]) == 2
    assert "fp8" in capsys.readouterr().err
    assert main(["quantize", str(src), "--mode", "int4", "--out", str(tmp_path / "f")]) == 2
    assert "int8" in capsys.readouterr().err
    assert main(["quantize", str(out_dir), "--mode", "int8", "--out", str(tmp_path / "qq"), "--device", "cpu"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "f").exists() and not (tmp_path / "qq").exists()


def test_generate_quantize_flag_and_pipeline_quantize(tmp_path, capsys):
    pytest.importorskip("diffusers")
    import yaml

    from sanaflow.pipelines.text_to_image import load_pipeline
    from tiny_sana import save_tiny_sana

    src = save_tiny_sana(tmp_path / "pipe")
    kw = dict(seed=0, num_inference_steps=3, output_type="pt", height=64, width=64)
    ref = load_pipeline(src, device="cpu")("a red cat", **kw).images
    pipe = load_pipeline(src, device="cpu", quantize="int8")
    assert is_quantized(pipe.transformer) == "int8"
    assert cosine(pipe("a red cat", **kw).images, ref) >= 0.99
    with pytest.raises(ConfigError, match="already quantized"):
        pipe.quantize("int8")
    compiled = load_pipeline(src, device="cpu").compile(backend="eager")
    with pytest.raises(ConfigError, match="before compile"):
        compiled.quantize("int8")

    out = tmp_path / "out"
    assert main(["generate", "a red cat", "--model", str(src), "--size", "64x64", "--steps", "2", "--device", "cpu",
                 "--quantize", "int8", "--seed", "1", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["quantize"] == "int8"
    # errors: one line, exit 2, nothing written
    capsys.readouterr()
    for mode, words in (("fp8", "fp8"), ("int4", "int8")):
        bad = tmp_path / f"bad-{mode}"
        assert main(["generate", "a red cat", "--model", str(src), "--size", "64x64", "--steps", "1",
                     "--device", "cpu", "--quantize", mode, "--out", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
        assert not bad.exists() or not list(bad.glob("*.png"))


# ----------------------------------------------------------------------------------------------
# fp8 producers: the norms and the residual add hand fp8 layers quantized rows (CPU)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_fp8(monkeypatch):
    """fp8 layers that run on the CPU: torch's CPU _scaled_mm for the GPU's (the fp8 device checks patched)."""
    a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:  # older torch: no CPU _scaled_mm
        pytest.skip(f"torch._scaled_mm unavailable on CPU: {e}")
    monkeypatch.setattr(layers, "_on_fp8_device", lambda x: True)
    monkeypatch.setattr(quant, "check_quantization", lambda mode, device: None)
    monkeypatch.setattr(norm_ops, "FUSED_NORM", True)  # the switch the rows path follows (the suite may run it off)


def fp8_pair(dtype=torch.float32, num_layers=2):
    """(float model, its fp8 copy) of the tiny config on the CPU."""
    torch.manual_seed(0)
    model = SanaTransformer(**{**TINY, "num_layers": num_layers}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    model = model.to(dtype)
    qmodel = SanaTransformer(**{**TINY, "num_layers": num_layers}).eval().to(dtype)
    qmodel.load_state_dict(model.state_dict())
    return model, quantize_transformer(qmodel, "fp8")


def spy(monkeypatch) -> dict[str, int]:
    """Count the block's fp8 producers and what its fp8 matmuls are given (rows or tensors)."""
    calls = {"norm": 0, "residual": 0, "rows_in": 0, "tensor_in": 0}

    def counted(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return run

    def matmul(x, *args):
        calls["rows_in" if isinstance(x, Fp8Rows) else "tensor_in"] += 1
        return fp8_matmul(x, *args)

    fp8_matmul = layers.fp8_linear
    monkeypatch.setattr(st, "norm_modulate_fp8", counted("norm", st.norm_modulate_fp8))
    monkeypatch.setattr(st, "gated_residual_fp8", counted("residual", st.gated_residual_fp8))
    monkeypatch.setattr(layers, "fp8_linear", matmul)
    return calls


def inputs_as(dtype):
    x, caption, t, mask = tiny_inputs()
    return x.to(dtype), caption.to(dtype), t, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_block_hands_rows_and_matches_the_unfused_block(cpu_fp8, monkeypatch, dtype):
    model, qmodel = fp8_pair(dtype)
    inputs = inputs_as(dtype)
    ref = run(model, inputs)
    calls = spy(monkeypatch)
    rows = run(qmodel, inputs)
    # per block: norm1 -> rows for attn1's q/k/v, x + gate * attn1 -> rows for attn2's q, norm2 -> rows
    # for ff's first 1x1 conv; with attn2's caption k/v rows (prequantize) 7 of 10 matmuls read rows
    assert calls == {"norm": 4, "residual": 2, "rows_in": 14, "tensor_in": 6}, calls
    monkeypatch.setattr(st, "fp8_rows_wanted", lambda x: False)  # the unfused block: each layer quantizes
    plain = run(qmodel, inputs)
    assert calls == {"norm": 4, "residual": 2, "rows_in": 24, "tensor_in": 16}, calls  # q/k/v, caption k/v: rows
    # Without the kernels (CPU, outside the interpreter) the producers run the torch path and quantize
    # with the reference: the very rows the layers build themselves, so the outputs agree bit for bit.
    assert torch.equal(rows, plain)
    assert cosine(rows, ref) >= 0.99 and not torch.equal(rows.float(), ref.float())


def test_fp8_rows_reach_only_default_processors_and_unhooked_modules(cpu_fp8, monkeypatch):
    _, qmodel = fp8_pair(num_layers=3)
    inputs = inputs_as(torch.float32)
    monkeypatch.setattr(st, "fp8_rows_wanted", lambda x: False)
    plain = run(qmodel, inputs)  # no rows anywhere
    monkeypatch.setattr(st, "fp8_rows_wanted", layers.fp8_rows_wanted)
    seen = []

    class SelfRecorder(LinearSelfAttnProcessor):  # a subclass: the same math, but not the default class
        def __call__(self, attn, hidden_states, height, width):
            seen.append(("attn1 processor", type(hidden_states)))
            return super().__call__(attn, hidden_states, height, width)

    class CrossRecorder(SoftmaxCrossAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states, attention_bias):
            seen.append(("attn2 processor", type(hidden_states)))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_bias)

    b0, b1, b2 = qmodel.transformer_blocks
    # block 0: a custom attn1 processor (TokenFlow's, PAG's), a pre-hook on attn2, ff free
    qmodel.set_attn_processor({"transformer_blocks.0.attn1": SelfRecorder()})
    b0.attn2.register_forward_pre_hook(lambda m, args: seen.append(("attn2 pre-hook", type(args[0]))))
    # block 1: attn1 free, a custom attn2 processor, a forward hook on ff (TokenFlow's feature hook)
    qmodel.set_attn_processor({"transformer_blocks.1.attn2": CrossRecorder()})
    b1.ff.register_forward_hook(lambda m, args, out: seen.append(("ff hook", type(args[0]))))
    # block 2: hooks on the fp8 layers themselves (attn1's to_k, ff's conv_inverted); attn2 free
    b2.attn1.to_k.register_forward_pre_hook(lambda m, args: seen.append(("to_k pre-hook", type(args[0]))))
    b2.ff.conv_inverted.register_forward_pre_hook(lambda m, args: seen.append(("conv pre-hook", type(args[0]))))
    calls = spy(monkeypatch)
    got = run(qmodel, inputs)
    assert sorted({name for name, _ in seen}) == ["attn1 processor", "attn2 pre-hook", "attn2 processor", "conv pre-hook",
                                                  "ff hook", "to_k pre-hook"]
    assert all(kind is torch.Tensor for _, kind in seen), seen
    assert (calls["norm"], calls["residual"]) == (2, 1)  # block 0's norm2, block 1's norm1, block 2's residual
    assert torch.equal(got, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_model_with_deferred_block_residuals_matches(cpu_fp8, monkeypatch, dtype):
    # each block's last gated residual added in the next block's norm1 pass (forced on the CPU, where the
    # norms then take the torch path): with fp8 rows from norm1 the same bits as the blocks' own adds
    _, qmodel = fp8_pair(dtype, num_layers=3)
    inputs = inputs_as(dtype)
    plain = run(qmodel, inputs)
    monkeypatch.setattr(norm_ops, "row_kernels_run", lambda x: True)
    calls = spy(monkeypatch)
    deferred = run(qmodel, inputs)
    assert (calls["norm"], calls["residual"]) == (6, 3)
    assert torch.equal(deferred, plain)


def test_accepts_fp8_rows_wants_unhooked_fp8_layers():
    lin = Fp8Linear.from_float(torch.nn.Linear(32, 16))
    conv = Fp8Linear.from_float(torch.nn.Conv2d(32, 16, 1))
    assert accepts_fp8_rows(lin, conv)
    assert not accepts_fp8_rows(lin, torch.nn.Linear(32, 16))
    assert not accepts_fp8_rows(Int8WeightOnlyLinear.from_float(torch.nn.Linear(32, 16)))
    conv.register_forward_hook(lambda *a: None)
    assert not accepts_fp8_rows(lin, conv)  # a hook would see rows instead of the tensor it expects


def test_fp8_pointwise_conv_reads_token_rows(cpu_fp8):
    conv = Fp8Linear.from_float(torch.nn.Conv2d(32, 16, 1).bfloat16())
    tokens = torch.randn(2, 12, 32).bfloat16()  # (B, N = 3 * 4, C)
    grid = tokens.unflatten(1, (3, 4)).permute(0, 3, 1, 2)  # (B, C, 3, 4) channels-last view
    q, scale = quantize_fp8_rows(tokens.reshape(-1, 32))
    out = conv(Fp8Rows(q, scale, tokens.shape, tokens.dtype))
    assert out.shape == (2, 12, 16)  # tokens in, tokens out
    assert torch.equal(out, conv(grid).flatten(2).transpose(1, 2))


def test_fp8_rows_path_compiles_into_one_graph(cpu_fp8, monkeypatch):
    from sanaflow.pipelines.acceleration import compile_module

    torch._dynamo.reset()
    _, qmodel = fp8_pair(torch.bfloat16)
    inputs = inputs_as(torch.bfloat16)
    eager = run(qmodel, inputs)
    calls = spy(monkeypatch)
    try:
        whole = run(torch.compile(qmodel, fullgraph=True, backend="eager"), inputs)  # a graph break fails
        assert calls["norm"] == 4 and calls["residual"] == 2  # traced through the producers
        regional = run(compile_module(qmodel, backend="eager", regional=True), inputs)
    finally:
        torch._dynamo.reset()
    assert torch.equal(whole, eager) and torch.equal(regional, eager)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------


def _gpu_model(dtype=torch.bfloat16):
    # one 1600M-wide block pair: the real layer sizes, two layers to keep it quick
    torch.manual_seed(0)
    model = SanaTransformer(num_layers=2).to("cuda", dtype).eval()
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 32, 32, 32, device="cuda", generator=g, dtype=dtype)
    caption = torch.randn(2, 300, 2304, device="cuda", generator=g, dtype=dtype)
    return model, (x, caption, torch.tensor([500.0, 500.0], device="cuda"), None)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_gpu_quantized_close_to_bf16(mode, tmp_path):
    from sanaflow.quant import fp8_supported

    if mode == "fp8" and not fp8_supported():
        pytest.skip("no FP8 tensor cores on this GPU")
    model, inputs = _gpu_model()
    ref = run(model, inputs)
    quantize_transformer(model, mode)
    out = run(model, inputs)
    assert cosine(out, ref) >= 0.99
    compiled = torch.compile(model, fullgraph=True)
    assert cosine(run(compiled, inputs), out) >= 0.999
    save_quantized(model, tmp_path / "q")
    loaded = SanaTransformer.from_pretrained(tmp_path / "q", torch_dtype=torch.bfloat16, device="cuda")
    assert torch.equal(run(loaded, inputs), out)


@pytest.mark.gpu
def test_gpu_fp8_block_with_fused_producers_matches_unfused_and_bf16(monkeypatch):
    from sanaflow.pipelines.acceleration import compile_module
    from sanaflow.quant import fp8_supported

    if not fp8_supported():
        pytest.skip("no FP8 tensor cores on this GPU")
    if not norm_ops.FUSED_NORM:
        pytest.skip("SANAFLOW_FUSED_NORM is off: no fused producers")
    model, inputs = _gpu_model()
    block = model.transformer_blocks[0]
    g = torch.Generator(device="cuda").manual_seed(4)
    D = block.norm1.normalized_shape[0]
    tokens = torch.randn(2, 64 * 64, D, device="cuda", generator=g).bfloat16()  # (B, N, D) at 2048 px
    context = torch.randn(2, 300, D, device="cuda", generator=g).bfloat16()
    modulation = (torch.randn(2, 6 * D, device="cuda", generator=g) * 0.5).bfloat16()
    block_args = (tokens, context, None, modulation, 64, 64)
    with torch.no_grad():
        ref_block = block(*block_args)
        ref = run(model, inputs)
        quantize_transformer(model, "fp8")
        calls = spy(monkeypatch)
        fused_block = block(*block_args)
        assert (calls["norm"], calls["residual"]) == (2, 1)  # the producers wrote fp8 rows
        fused = run(model, inputs)
        monkeypatch.setattr(st, "fp8_rows_wanted", lambda x: False)  # fused norms still on; layers quantize
        unfused_block = block(*block_args)
        unfused = run(model, inputs)
        monkeypatch.setattr(st, "fp8_rows_wanted", layers.fp8_rows_wanted)
        torch._dynamo.reset()
        regional = run(compile_module(model, regional=True), inputs)  # inductor traces the new kernels
        torch._dynamo.reset()
    assert cosine(fused_block, unfused_block) >= 0.9999
    assert cosine(fused, unfused) >= 0.9999
    assert cosine(fused_block, ref_block) >= 0.99 and cosine(fused, ref) >= 0.99
    assert cosine(regional, fused) >= 0.9999


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_gpu_deferred_block_residuals_match_the_blocks_own(quantize, monkeypatch):
    from sanaflow.pipelines.acceleration import compile_module
    from sanaflow.quant import fp8_supported

    if quantize == "fp8" and not fp8_supported():
        pytest.skip("no FP8 tensor cores on this GPU")
    if not norm_ops.FUSED_NORM:
        pytest.skip("SANAFLOW_FUSED_NORM is off: nothing is deferred")
    _, inputs = _gpu_model()
    model = SanaTransformer(num_layers=4).to("cuda", torch.bfloat16).eval()  # residuals handed on 3 times
    if quantize:
        quantize_transformer(model, quantize)
    x = inputs[0]
    with torch.no_grad():
        assert model._defers_block_residuals(model.patch_embed(x), None)
        deferred = run(model, inputs)
        torch._dynamo.reset()
        regional = run(compile_module(model, regional=True), inputs)  # the norm kernel's gated variant, traced
        torch._dynamo.reset()
        monkeypatch.setattr(SanaTransformer, "_defers_block_residuals", lambda self, x, samples: False)
        plain = run(model, inputs)
    # the kernel's fused multiply-add vs torch's addcmul: one rounding apart on rare elements
    assert cosine(deferred, plain) >= 0.9999
    assert cosine(regional, deferred) >= 0.9999


def _tree(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_quantize_refuses_an_out_that_would_destroy_files_before_loading(tmp_path, monkeypatch, capsys):
    # Source: a transformer folder, inside a user folder that also holds other work.
    user = tmp_path / "qt"
    src = user / "m"
    tiny_model().save_pretrained(src)
    (user / "precious.txt").write_text("keep me")
    notes = tmp_path / "userdir"
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes")
    (tmp_path / "afile").write_text("a file")
    # A config.json alone does not make a model folder: these hold user files beside it.
    mixed = tmp_path / "mixed"
    (mixed / "sub").mkdir(parents=True)
    (mixed / "config.json").write_text("{}")
    (mixed / "notes.txt").write_text("important")
    (mixed / "sub" / "data.txt").write_text("x")
    pipe_like = tmp_path / "pipe_like"
    (pipe_like / "transformer").mkdir(parents=True)
    (pipe_like / "photos").mkdir()
    (pipe_like / "model_index.json").write_text('{"transformer": ["sanaflow", "SanaTransformer"]}')
    (pipe_like / "transformer" / "config.json").write_text("{}")
    (pipe_like / "photos" / "cat.jpg").write_bytes(b"jpg")
    before = {d: _tree(d) for d in (user, notes, mixed, pipe_like)}

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(SanaTransformer, "from_pretrained", boom)
    cases = {
        str(user): "holds the source",  # a parent of the source: was replaced wholesale (data loss)
        str(src): "is the source",
        str(src / "sub"): "inside the source",
        str(src) + "/../m/": "is the source",
        str(notes): "holding other files",  # a non-empty folder that is no model: was deleted
        str(mixed): "holding other files",  # a config.json beside user files: was deleted
        str(pipe_like): "holding other files",  # a folder no model_index.json entry names
        str(tmp_path / "afile"): "existing file",
        str(tmp_path / "afile" / "x"): "is a file",
        "": "--out is empty",
        "  ": "--out is empty",
    }
    for out, needle in cases.items():
        capsys.readouterr()
        assert main(["quantize", str(src), "--mode", "int8", "--out", out, "--device", "cpu"]) == 2, out
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("sanaflow: error:") and needle in err, (out, err)
    # the user's files all survive, and nothing else was written
    assert {d: _tree(d) for d in (user, notes, mixed, pipe_like)} == before
    assert (tmp_path / "afile").read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "mixed", "pipe_like", "qt", "userdir"]
    assert sorted(p.name for p in user.iterdir()) == ["m", "precious.txt"]


def test_cli_quantize_writes_a_new_an_empty_or_an_earlier_model_folder(tmp_path, capsys):
    src = tmp_path / "m"
    tiny_model().save_pretrained(src)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "q", tmp_path / "empty", tmp_path / "empty"):  # the last replaces a model
        assert main(["quantize", str(src), "--mode", "int8", "--out", str(out), "--device", "cpu"]) == 0
        assert is_quantized(SanaTransformer.from_pretrained(out)) == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "m", "new"]  # no temporaries left
    assert not is_quantized(SanaTransformer.from_pretrained(src))  # the source is untouched
