"""Fused (residual +) LayerNorm + modulation and fp8 row quantisation (`sanaflow.ops.triton_norm`).

On CPU the kernels run in Triton's interpreter (switched on before triton is imported), so those
checks run in a subprocess with ``TRITON_INTERPRET=1`` and report errors as JSON; the oracle is the
torch path in float64. Triton's interpreter does not round to float8 as the GPU does, so on CPU the
row quantisation is checked with float32 output (its scales and scaled values), and the float8
cast itself against torch's on a GPU (``gpu``), where the whole model is also compared with the
kernels on and off.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from sanaflow.errors import InputError
from sanaflow.ops import norm as norm_ops
from sanaflow.ops.triton_norm import norm_modulate, quantize_rows
from sanaflow.quant.layers import FP8_MAX, Fp8Rows, prequantize
from triton_interp import HAS_TRITON, interpreter_fixture

TINY = dict(in_channels=4, out_channels=4, attention_head_dim=16, caption_channels=32, mlp_ratio=2.5,
            sample_size=8, patch_size=1, attention_bias=False, norm_elementwise_affine=False, norm_eps=1e-6,
            interpolation_scale=None, num_attention_heads=2, num_layers=2, num_cross_attention_heads=2,
            cross_attention_head_dim=16, cross_attention_dim=32)

_INTERPRETER_SCRIPT = r"""
import json, torch
from torch import nn
from sanaflow.ops.triton_norm import norm_modulate, quantize_rows, _INTERPRETING
from sanaflow.quant.layers import quantize_fp8_rows_reference, FP8_MAX, _SCALE_MIN

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

def norm_case(B, N, D, dtype, seed, residual=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, N, D, generator=g) * scale + 0.3).to(dtype)
    r = torch.randn(B, N, D, generator=g).to(dtype) if residual else None
    mod = torch.randn(B, 6, D, generator=g).to(dtype)  # shift / scale are strided views, as in the block
    shift, sc = mod[:, 3:4], mod[:, 4:5]
    x_new, h = norm_modulate(x, shift, sc, 1e-6, r)
    xs = (x + r) if residual else x  # the stored residual stream, in its dtype
    ln = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
    ref = torch.addcmul(shift.double(), ln(xs.double()), 1 + sc.double())
    same = torch.addcmul(shift, ln(xs), 1 + sc).to(dtype)  # the block's torch path in this dtype
    return {"dtype": str(h.dtype), "shape": list(h.shape), "x_exact": bool(torch.equal(x_new, xs)), "x_rel": rel(x_new, xs),
            "x_is_input": x_new is x, "h": rel(h, ref), "vs_same_dtype": rel(h, same),
            "finite": bool(torch.isfinite(h).all())}

def quant_case(M, K, dtype, seed, zero_row=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 5).to(dtype)
    if zero_row:
        x[1] = 0
    q, s = quantize_rows(x, torch.float32, FP8_MAX, _SCALE_MIN)
    _, s_ref = quantize_fp8_rows_reference(x)
    scaled = (x.float() / s_ref).clamp(-FP8_MAX, FP8_MAX)
    return {"scale_exact": bool(torch.equal(s, s_ref)), "values": rel(q, scaled),
            "max_abs": q.abs().max().item(), "zero_row_ok": (not zero_row) or bool((q[1] == 0).all())}

TINY = dict(in_channels=4, out_channels=4, attention_head_dim=16, caption_channels=32, mlp_ratio=2.5,
            sample_size=8, patch_size=1, attention_bias=False, norm_elementwise_affine=False, norm_eps=1e-6,
            interpolation_scale=None, num_attention_heads=2, num_layers=2, num_cross_attention_heads=2,
            cross_attention_head_dim=16, cross_attention_dim=32)
res = {"interpreting": _INTERPRETING}
res["fp32_res"] = norm_case(2, 5, 40, torch.float32, 1)  # D = 40: a padded block of 64
res["fp32_nores"] = norm_case(1, 3, 64, torch.float32, 2, residual=False)
res["fp32_large"] = norm_case(2, 4, 24, torch.float32, 3, scale=300.0)  # a large mean and spread
res["bf16_res"] = norm_case(2, 6, 48, torch.bfloat16, 4)
res["fp16_nores"] = norm_case(1, 4, 32, torch.float16, 5, residual=False)
res["quant_bf16"] = quant_case(7, 300, torch.bfloat16, 6)
res["quant_fp32_zero_row"] = quant_case(4, 33, torch.float32, 7, zero_row=True)

# the whole model with the fused norms (tokens on CPU: the kernel runs in the interpreter)
import functools
import sanaflow.models.sana_transformer as st
torch.manual_seed(0)
model = st.SanaTransformer(**TINY).eval()
x = torch.randn(2, 4, 8, 8)
ctx = torch.randn(2, 5, 32)
mask = torch.ones(2, 5); mask[1, 3:] = 0
with torch.no_grad():
    ref = model(x, ctx, torch.tensor([700.0, 20.0]), encoder_attention_mask=mask)
    st.norm_modulate = functools.partial(st.norm_modulate, enabled=True)
    out = model(x, ctx, torch.tensor([700.0, 20.0]), encoder_attention_mask=mask)
res["model"] = rel(out, ref)
print("RESULT" + json.dumps(res))
"""


interpreter_results = interpreter_fixture(_INTERPRETER_SCRIPT)


def test_interpreter_is_really_used(interpreter_results):
    assert interpreter_results["interpreting"] is True


@pytest.mark.parametrize("name", ["fp32_res", "fp32_nores", "fp32_large"])
def test_interpreter_fp32_norm_matches_torch(interpreter_results, name):
    r = interpreter_results[name]
    assert r["finite"] and r["dtype"] == "torch.float32"
    assert r["x_exact"]  # the residual stream is x + r exactly (x itself without a residual)
    assert r["h"] < 1e-5 and r["vs_same_dtype"] < 1e-5, r


def test_interpreter_norm_without_residual_returns_the_input(interpreter_results):
    assert interpreter_results["fp32_nores"]["x_is_input"] is True
    assert interpreter_results["fp32_res"]["x_is_input"] is False


@pytest.mark.parametrize("name, dtype, bound", [("bf16_res", "bfloat16", 1e-2), ("fp16_nores", "float16", 2e-3)])
def test_interpreter_half_norm_matches_torch(interpreter_results, name, dtype, bound):
    r = interpreter_results[name]
    assert r["finite"] and r["dtype"] == f"torch.{dtype}"
    # the interpreter's casts to half types need not round as the GPU's do (bit-exact there: GPU test)
    assert r["x_rel"] < bound, r
    assert r["h"] < bound, r  # float32 inside, one final rounding
    assert r["vs_same_dtype"] < bound, r  # the torch path rounds the norm before the modulation


@pytest.mark.parametrize("name", ["quant_bf16", "quant_fp32_zero_row"])
def test_interpreter_row_quantisation(interpreter_results, name):
    r = interpreter_results[name]
    assert r["scale_exact"], r  # the same scales as the torch path, bit for bit
    assert r["values"] < 1e-6 and r["max_abs"] <= FP8_MAX, r
    assert r["zero_row_ok"]


def test_interpreter_model_with_fused_norms_matches_torch_path(interpreter_results):
    assert interpreter_results["model"] < 1e-5, interpreter_results["model"]


def test_bad_inputs_are_refused():
    x = torch.randn(2, 5, 8)
    with pytest.raises(InputError, match=r"\(B, N, D\)"):
        norm_modulate(torch.randn(5, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8), 1e-6)
    with pytest.raises(InputError, match="shift"):
        norm_modulate(x, torch.randn(2, 1, 7), torch.randn(2, 1, 8), 1e-6)
    with pytest.raises(InputError, match="residual"):
        norm_modulate(x, torch.randn(2, 1, 8), torch.randn(2, 1, 8), 1e-6, residual=torch.randn(2, 4, 8))
    with pytest.raises(InputError, match="float32"):
        norm_modulate(x.double(), torch.randn(2, 1, 8), torch.randn(2, 1, 8), 1e-6)
    with pytest.raises(InputError, match="float8"):
        quantize_rows(torch.randn(3, 4), torch.int8, 127.0, 1e-12)
    with pytest.raises(InputError, match="rows, K"):
        quantize_rows(torch.randn(3), torch.float8_e4m3fn, FP8_MAX, 1e-12)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cpu_tensors_outside_the_interpreter_are_refused():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the whole run uses Triton's interpreter")
    with pytest.raises(InputError, match="CUDA"):
        norm_modulate(torch.randn(2, 5, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8), 1e-6)
    with pytest.raises(InputError, match="CUDA"):
        quantize_rows(torch.randn(3, 4), torch.float8_e4m3fn, FP8_MAX, 1e-12)


def test_dispatch_falls_back_to_the_torch_path():
    torch.manual_seed(0)
    ln = nn.LayerNorm(8, elementwise_affine=False, eps=1e-6)
    x, r, shift, scale = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    x_new, h = norm_ops.norm_modulate(ln, x, shift, scale, residual=r)
    assert torch.equal(x_new, x + r)
    torch.testing.assert_close(h, torch.addcmul(shift, ln(x + r), 1 + scale))
    x_same, _ = norm_ops.norm_modulate(ln, x, shift, scale)
    assert x_same is x
    # CPU tokens outside the interpreter, or the switch off: never the kernel
    assert not norm_ops._fusable(ln, x, None)
    assert not norm_ops._fusable(ln, x, False)


def test_dispatch_refuses_affine_hooked_and_training_norms(monkeypatch):
    monkeypatch.setattr(norm_ops, "_interpreting", lambda: True)  # CPU tokens count as the kernel's
    x = torch.randn(2, 5, 8)
    plain = nn.LayerNorm(8, elementwise_affine=False)
    assert norm_ops._fusable(plain, x, True)
    assert not norm_ops._fusable(nn.LayerNorm(8), x, True)  # affine: the kernel has no weight / bias
    hooked = nn.LayerNorm(8, elementwise_affine=False)
    hooked.register_forward_hook(lambda *a: None)
    assert not norm_ops._fusable(hooked, x, True)  # a hook must see the module run
    assert not norm_ops._fusable(plain, x.requires_grad_(), True)  # forward-only kernel
    assert not norm_ops._fusable(nn.RMSNorm(8), torch.randn(2, 5, 8), True)


def test_dispatch_switch_follows_the_environment():
    switch = os.environ.get("SANAFLOW_FUSED_NORM")
    assert norm_ops.FUSED_NORM == (switch is None or switch.lower() not in ("0", "false", "off", "no"))


def test_prequantize_leaves_other_layers_and_cpu_alone():
    x = torch.randn(2, 3, 8)
    lin = nn.Linear(8, 4)
    assert prequantize(x, lin, lin) is x  # not fp8 layers
    assert not isinstance(prequantize(x), Fp8Rows)  # CPU tokens


# ------------------------------------------------------------------------------------------- GPU


def _gpu_ready():
    if not torch.cuda.is_available() or not HAS_TRITON:
        pytest.skip("needs a CUDA GPU and triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gpu_norm_modulate_at_model_width(dtype, bound):
    _gpu_ready()
    g = torch.Generator("cuda").manual_seed(0)
    B, N, D = 2, 4096, 2240  # the 1600M width, 2048 px
    x = torch.randn(B, N, D, device="cuda", generator=g).to(dtype)
    r = torch.randn(B, N, D, device="cuda", generator=g).to(dtype)
    mod = torch.randn(B, 6, D, device="cuda", generator=g).to(dtype)
    shift, scale = mod[:, 3:4], mod[:, 4:5]
    x_new, h = norm_modulate(x, shift, scale, 1e-6, r)
    ln = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
    assert torch.equal(x_new, x + r)
    ref = torch.addcmul(shift.double(), ln((x + r).double()), 1 + scale.double())
    err = ((h.double() - ref).norm() / ref.norm()).item()
    assert err < bound, err


@pytest.mark.gpu
def test_gpu_row_quantisation_matches_torch_bit_for_bit():
    _gpu_ready()
    from sanaflow.quant.layers import quantize_fp8_rows, quantize_fp8_rows_reference

    g = torch.Generator("cuda").manual_seed(1)
    for K in (2240, 5600, 37):
        x = (torch.randn(1000, K, device="cuda", generator=g) * 7).bfloat16()
        x[3] = 0
        q, s = quantize_fp8_rows(x)
        q_ref, s_ref = quantize_fp8_rows_reference(x)
        assert torch.equal(s, s_ref)
        mismatch = (q.float() != q_ref.float()).float().mean().item()
        assert mismatch < 1e-4, (K, mismatch)  # a division rounding apart at most, on a rare element


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_gpu_model_with_fused_kernels_matches_torch_path(quantize, monkeypatch):
    _gpu_ready()
    from sanaflow.models.sana_transformer import SanaTransformer
    from sanaflow.quant import quantize_transformer

    if quantize == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    torch.manual_seed(0)
    cfg = dict(TINY, num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128,
               num_cross_attention_heads=4, cross_attention_head_dim=32)
    model = SanaTransformer(**cfg).cuda().bfloat16().eval()
    if quantize:
        model = quantize_transformer(model, quantize)
    x = torch.randn(2, 4, 16, 16, device="cuda").bfloat16()
    ctx = torch.randn(2, 7, 32, device="cuda").bfloat16()
    t = torch.tensor([500.0, 30.0], device="cuda")
    with torch.no_grad():
        fused = model(x, ctx, t).float()
        monkeypatch.setattr(norm_ops, "FUSED_NORM", False)
        plain = model(x, ctx, t).float()
    cos = torch.nn.functional.cosine_similarity(fused.flatten(), plain.flatten(), dim=0).item()
    assert cos > 0.999, cos
