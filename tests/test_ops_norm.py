"""Fused (residual +) LayerNorm + modulation and fp8 row quantisation (`sanaflow.ops.triton_norm`).

On CPU the kernels run in Triton's interpreter (switched on before triton is imported), so those
checks run in a subprocess with ``TRITON_INTERPRET=1`` and report errors as JSON; the oracle is the
torch path in float64. Triton's interpreter does not round to float8 as the GPU does (a value that
rounds up to a power of two loses the carry: 125 -> 64), so on CPU the quantizing kernels write
float32 (their scales and scaled values, cast to float8 by torch), and the float8 cast itself is
checked against torch's on a GPU (``gpu``), where the whole model is also compared with the kernels
on and off.

The passes that write fp8 rows directly (norm -> fp8, gated residual -> fp8) are checked against
the unfused path: the norm kernel's h quantized by `quantize_rows` and by the torch reference.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from sanaflow.errors import InputError
from sanaflow.ops import norm as norm_ops
from sanaflow.ops.triton_norm import (
    gated_residual_quantize,
    norm_modulate,
    norm_modulate_quantize,
    quantize_rows,
)
from sanaflow.quant.layers import (
    _SCALE_MIN,
    FP8_DTYPE,
    FP8_MAX,
    Fp8Rows,
    gated_residual_fp8,
    norm_modulate_fp8,
    prequantize,
    quantize_fp8_rows_reference,
)
from triton_interp import HAS_TRITON, interpreter_fixture

TINY = dict(in_channels=4, out_channels=4, attention_head_dim=16, caption_channels=32, mlp_ratio=2.5,
            sample_size=8, patch_size=1, attention_bias=False, norm_elementwise_affine=False, norm_eps=1e-6,
            interpolation_scale=None, num_attention_heads=2, num_layers=2, num_cross_attention_heads=2,
            cross_attention_head_dim=16, cross_attention_dim=32)

_INTERPRETER_SCRIPT = r"""
import json, torch
from torch import nn
from sanaflow.ops.triton_norm import (norm_modulate, quantize_rows, _INTERPRETING, norm_modulate_quantize,
                                     gated_residual_quantize)
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

def eq_bytes(a, b):
    return bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))

def norm_quant_case(B, N, D, dtype, seed, residual=True):
    # the fused norm -> fp8 rows vs the unfused path: the norm kernel's h, then quantize_rows / the reference
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, N, D, generator=g) * 3 + 0.3).to(dtype)
    r = torch.randn(B, N, D, generator=g).to(dtype) if residual else None
    mod = torch.randn(B, 6, D, generator=g).to(dtype)
    shift, sc = mod[:, 3:4], mod[:, 4:5]
    x_new, q, s = norm_modulate_quantize(x, shift, sc, 1e-6, r, torch.float32, FP8_MAX, _SCALE_MIN)
    x_ref, h = norm_modulate(x, shift, sc, 1e-6, r)
    q_k, s_k = quantize_rows(h.reshape(-1, D), torch.float32, FP8_MAX, _SCALE_MIN)
    q_ref, s_ref = quantize_fp8_rows_reference(h.reshape(-1, D))
    return {"shapes": [list(q.shape), list(s.shape)], "x_exact": bool(torch.equal(x_new, x_ref)),
            "x_is_input": x_new is x, "scale_vs_kernel": bool(torch.equal(s, s_k)),
            "values_vs_kernel": bool(torch.equal(q, q_k)), "scale_vs_reference": bool(torch.equal(s, s_ref)),
            "fp8_vs_reference": eq_bytes(q.to(torch.float8_e4m3fn), q_ref), "max_abs": q.abs().max().item()}

def residual_quant_case(B, N, D, dtype, seed):
    # x' = x + gate * y and its fp8 rows vs torch.addcmul and the reference quantisation
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, N, D, generator=g) * 4).to(dtype)
    y = torch.randn(B, N, D, generator=g).to(dtype)
    x[0, 1], y[0, 1] = 0, 0  # an all-zero row of x'
    gate = torch.randn(B, 6, D, generator=g).to(dtype)[:, 2:3]  # a strided (B, 1, D) view, as in the block
    x_new, q, s = gated_residual_quantize(x, gate, y, torch.float32, FP8_MAX, _SCALE_MIN)
    ref = torch.addcmul(x, gate, y)
    # one rounding to the dtype apart at most (the interpreter neither fuses the multiply-add nor rounds
    # to bfloat16 to nearest as the GPU does; bit for bit there: GPU test)
    bound = torch.finfo(dtype).eps * (x.double().abs() + (gate.double() * y.double()).abs())
    q_ref, s_ref = quantize_fp8_rows_reference(x_new.reshape(-1, D))
    q_add, s_add = quantize_fp8_rows_reference(ref.reshape(-1, D))
    return {"shapes": [list(x_new.shape), list(q.shape), list(s.shape)], "dtype": str(x_new.dtype),
            "x_within_rounding": bool(((x_new.double() - ref.double()).abs() <= bound).all()),
            "scale_exact": bool(torch.equal(s, s_ref)), "fp8_exact": eq_bytes(q.to(torch.float8_e4m3fn), q_ref),
            "scale_vs_addcmul": ((s - s_add).abs() / s_add).max().item(),
            "zero_row": bool((q[1] == 0).all()) and 0 < s[1].item() < 1e-14}  # scale_min / qmax

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
res["normq_bf16_res"] = norm_quant_case(2, 6, 48, torch.bfloat16, 8)
res["normq_bf16_nores"] = norm_quant_case(1, 5, 40, torch.bfloat16, 9, residual=False)  # D = 40: padded lanes
res["normq_fp32_res"] = norm_quant_case(2, 3, 64, torch.float32, 10)
res["resq_bf16"] = residual_quant_case(2, 5, 40, torch.bfloat16, 11)
res["resq_fp32"] = residual_quant_case(2, 4, 64, torch.float32, 12)

def gated_norm_case(B, N, D, dtype, seed):
    # x' = x + gate * y (a previous block's deferred residual) added in the norm's pass, vs addcmul; and
    # the norm of the stored x' vs the ungated kernel on it (the same bits)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, N, D, generator=g) * 4).to(dtype)
    y = torch.randn(B, N, D, generator=g).to(dtype)
    mod = torch.randn(B, 6, D, generator=g).to(dtype)  # strided (B, 1, D) views, as in the block
    shift, sc, gate = mod[:, 0:1], mod[:, 1:2], mod[:, 5:6]
    x_new, h = norm_modulate(x, shift, sc, 1e-6, y, gate)
    ref = torch.addcmul(x, gate, y)
    bound = torch.finfo(dtype).eps * (x.double().abs() + (gate.double() * y.double()).abs())
    x_same, h_same = norm_modulate(x_new, shift, sc, 1e-6)
    xq, q, s = norm_modulate_quantize(x, shift, sc, 1e-6, y, torch.float32, FP8_MAX, _SCALE_MIN, residual_gate=gate)
    _, q_k, s_k = norm_modulate_quantize(x_new, shift, sc, 1e-6, None, torch.float32, FP8_MAX, _SCALE_MIN)
    return {"x_within_rounding": bool(((x_new.double() - ref.double()).abs() <= bound).all()),
            "h_vs_ungated": bool(torch.equal(h, h_same)), "x_new_stored": x_new is not x,
            "quant_x": bool(torch.equal(xq, x_new)), "quant_vs_ungated": bool(torch.equal(q, q_k) and torch.equal(s, s_k))}

res["gated_bf16"] = gated_norm_case(2, 5, 40, torch.bfloat16, 13)
res["gated_fp32"] = gated_norm_case(2, 3, 64, torch.float32, 14)

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

# the same with each block's last gated residual left to the next block's norm1 kernel (SanaTransformer's
# inference loop, forced on CPU tokens), vs the blocks' own residual adds
from sanaflow.ops import norm as norm_ops
kernels_run = norm_ops.row_kernels_run
norm_ops.row_kernels_run = lambda t: True
deferred_blocks = []
block_forward = st.SanaTransformerBlock.forward
def spied(self, *args, defer_residual=False, **kwargs):
    deferred_blocks.append(defer_residual)
    return block_forward(self, *args, defer_residual=defer_residual, **kwargs)
st.SanaTransformerBlock.forward = spied
with torch.no_grad():
    deferred = model(x, ctx, torch.tensor([700.0, 20.0]), encoder_attention_mask=mask)
st.SanaTransformerBlock.forward = block_forward
norm_ops.row_kernels_run = kernels_run
res["model_deferred"] = {"rel": rel(deferred, out), "blocks": deferred_blocks}

# an fp8 model with the producers writing fp8 rows (kernels interpreted) vs the unfused path (the fused
# norm's bf16 h, quantized by the fp8 layers). torch's CPU _scaled_mm stands in for the GPU's: the fp8
# device check is patched. The interpreter's float8 store is wrong (see the module docstring), so the
# quantizing kernels write float32 here and torch casts to float8, as the GPU's store does.
import sanaflow.quant as quant
import sanaflow.quant.layers as layers
from sanaflow.ops import norm as norm_ops, triton_norm

def float_store(kernel, calls):
    def run(*args, **kwargs):
        *args, dtype, qmax, scale_min = args
        calls.append(kernel.__name__)
        x_new, q, s = kernel(*args, torch.float32, qmax, scale_min, **kwargs)
        return x_new, q.to(dtype), s
    return run

calls = []
triton_norm.norm_modulate_quantize = float_store(triton_norm.norm_modulate_quantize, calls)
triton_norm.gated_residual_quantize = float_store(triton_norm.gated_residual_quantize, calls)
layers._on_fp8_device = lambda t: True
quant.check_quantization = lambda mode, device: None
norm_ops.FUSED_NORM = True
wanted = st.fp8_rows_wanted
st.norm_modulate_fp8 = functools.partial(st.norm_modulate_fp8, enabled=True)
st.gated_residual_fp8 = functools.partial(st.gated_residual_fp8, enabled=True)
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    torch.manual_seed(0)
    qmodel = quant.quantize_transformer(st.SanaTransformer(**TINY).to(dtype).eval(), "fp8")
    args = (x.to(dtype), ctx.to(dtype), torch.tensor([700.0, 20.0]))
    calls.clear()
    with torch.no_grad():
        st.fp8_rows_wanted = wanted
        fused = qmodel(*args, encoder_attention_mask=mask)
        n_calls = len(calls)
        st.fp8_rows_wanted = lambda x: False
        unfused = qmodel(*args, encoder_attention_mask=mask)
    res[f"fp8_model_{name}"] = {"rel": rel(fused, unfused), "exact": bool(torch.equal(fused, unfused)),
                                "kernel_calls": n_calls, "unfused_calls": len(calls) - n_calls}
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


@pytest.mark.parametrize("name", ["gated_bf16", "gated_fp32"])
def test_interpreter_norm_with_a_gated_residual(interpreter_results, name):
    r = interpreter_results[name]
    # x' = addcmul(x, gate, y) up to its one rounding (the interpreter neither fuses the multiply-add nor
    # rounds to bfloat16 to nearest as the GPU does: GPU test), stored; the norm reads the stored x'
    assert r["x_within_rounding"] and r["x_new_stored"], r
    assert r["h_vs_ungated"] and r["quant_x"] and r["quant_vs_ungated"], r


def test_interpreter_model_with_deferred_block_residuals(interpreter_results):
    r = interpreter_results["model_deferred"]
    assert r["blocks"] == [True, True], r  # every block handed its residual on
    assert r["rel"] < 1e-5, r  # the block's addcmul vs the kernel's: float32 roundings apart


@pytest.mark.parametrize("name", ["normq_bf16_res", "normq_bf16_nores", "normq_fp32_res"])
def test_interpreter_norm_to_fp8_rows_equals_the_unfused_path(interpreter_results, name):
    r = interpreter_results[name]
    B, N, D = {"normq_bf16_res": (2, 6, 48), "normq_bf16_nores": (1, 5, 40), "normq_fp32_res": (2, 3, 64)}[name]
    assert r["shapes"] == [[B * N, D], [B * N, 1]]
    assert r["x_exact"] and r["x_is_input"] == name.endswith("nores")
    # Exact, no tolerance: the fused pass rounds h to the tokens' dtype before quantizing, so it
    # quantizes the very values the norm kernel stores and quantize_rows / the torch reference read back.
    assert r["scale_vs_kernel"] and r["values_vs_kernel"], r
    assert r["scale_vs_reference"] and r["fp8_vs_reference"], r
    assert r["max_abs"] <= FP8_MAX


@pytest.mark.parametrize("name", ["resq_bf16", "resq_fp32"])
def test_interpreter_gated_residual_to_fp8_rows(interpreter_results, name):
    r = interpreter_results[name]
    B, N, D = (2, 5, 40) if name == "resq_bf16" else (2, 4, 64)
    assert r["shapes"] == [[B, N, D], [B * N, D], [B * N, 1]]
    assert r["dtype"] == ("torch.bfloat16" if name == "resq_bf16" else "torch.float32")
    assert r["x_within_rounding"], r  # x' = addcmul(x, gate, y) up to its one rounding (exact on GPU)
    assert r["scale_exact"] and r["fp8_exact"], r  # the stored x' quantized exactly as the reference does
    # and so within that rounding of quantizing addcmul's x' (its scale moves by at most one ulp of the dtype)
    assert r["scale_vs_addcmul"] <= (2**-7 if name == "resq_bf16" else 2**-23), r
    assert r["zero_row"]


@pytest.mark.parametrize("name", ["fp8_model_fp32", "fp8_model_bf16"])
def test_interpreter_fp8_model_with_fused_producers(interpreter_results, name):
    r = interpreter_results[name]
    # per block: norm1 -> fp8 rows, the residual -> fp8 rows for attn2's query, norm2 -> fp8 rows; 2 blocks
    assert r["kernel_calls"] == 6 and r["unfused_calls"] == 0, r
    # The norms' rows are bit-identical to the unfused path's; the residual kernel's x' differs from
    # addcmul's by the interpreter's rounding of the multiply-add (not fused, truncated to bfloat16), which
    # moves a few fp8 values by one step.
    assert r["rel"] < (1e-3 if name == "fp8_model_fp32" else 2e-2), r


def test_bad_inputs_are_refused():
    x = torch.randn(2, 5, 8)
    with pytest.raises(InputError, match="residual_gate needs a residual"):
        norm_modulate(x, torch.randn(2, 1, 8), torch.randn(2, 1, 8), 1e-6, None, torch.randn(2, 1, 8))
    with pytest.raises(InputError, match="residual_gate must have shape"):
        norm_modulate(x, torch.randn(2, 1, 8), torch.randn(2, 1, 8), 1e-6, x, torch.randn(1, 1, 8))
    with pytest.raises(InputError, match="residual_gate dtype"):
        norm_modulate(x, torch.randn(2, 1, 8), torch.randn(2, 1, 8), 1e-6, x, torch.randn(2, 1, 8).double())
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
    shift = scale = torch.randn(2, 1, 8)
    with pytest.raises(InputError, match="float8"):
        norm_modulate_quantize(x, shift, scale, 1e-6, None, torch.bfloat16, FP8_MAX, 1e-12)
    with pytest.raises(InputError, match="shift"):
        norm_modulate_quantize(x, torch.randn(2, 1, 7), scale, 1e-6, None, FP8_DTYPE, FP8_MAX, 1e-12)
    with pytest.raises(InputError, match="gate"):
        gated_residual_quantize(x, torch.randn(1, 1, 8), x, FP8_DTYPE, FP8_MAX, 1e-12)
    with pytest.raises(InputError, match="y must have shape"):
        gated_residual_quantize(x, shift, torch.randn(2, 4, 8), FP8_DTYPE, FP8_MAX, 1e-12)
    with pytest.raises(InputError, match="share a dtype"):
        gated_residual_quantize(x, shift, x.bfloat16(), FP8_DTYPE, FP8_MAX, 1e-12)
    with pytest.raises(InputError, match=r"\(B, N, D\)"):
        gated_residual_quantize(torch.randn(5, 8), shift, torch.randn(5, 8), FP8_DTYPE, FP8_MAX, 1e-12)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cpu_tensors_outside_the_interpreter_are_refused():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the whole run uses Triton's interpreter")
    with pytest.raises(InputError, match="CUDA"):
        norm_modulate(torch.randn(2, 5, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8), 1e-6)
    with pytest.raises(InputError, match="CUDA"):
        quantize_rows(torch.randn(3, 4), torch.float8_e4m3fn, FP8_MAX, 1e-12)
    x, mod = torch.randn(2, 5, 8), torch.randn(2, 1, 8)
    with pytest.raises(InputError, match="CUDA"):
        norm_modulate_quantize(x, mod, mod, 1e-6, None, FP8_DTYPE, FP8_MAX, 1e-12)
    with pytest.raises(InputError, match="CUDA"):
        gated_residual_quantize(x, mod, x, FP8_DTYPE, FP8_MAX, 1e-12)


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
    assert norm_ops.norm_quantizer(ln, x, shift, scale) is None
    assert norm_ops.residual_quantizer(x, shift, r) is None
    # the producers' torch path: the torch norm / addcmul, then the reference quantisation
    x_new, rows = norm_modulate_fp8(ln, x, shift, scale, residual=r)
    q, s = quantize_fp8_rows_reference(torch.addcmul(shift, ln(x + r), 1 + scale).reshape(-1, 8))
    assert torch.equal(x_new, x + r) and rows.shape == x.shape and rows.dtype == x.dtype
    assert torch.equal(rows.scale, s) and torch.equal(rows.q.view(torch.uint8), q.view(torch.uint8))
    x_new, rows = gated_residual_fp8(x, shift, r)
    q, s = quantize_fp8_rows_reference(torch.addcmul(x, shift, r).reshape(-1, 8))
    assert torch.equal(x_new, torch.addcmul(x, shift, r))
    assert torch.equal(rows.scale, s) and torch.equal(rows.q.view(torch.uint8), q.view(torch.uint8))
    # a gated residual (a previous block's deferred one): addcmul, then the norm
    gate = torch.randn(2, 1, 8)
    x_new, h = norm_ops.norm_modulate(ln, x, shift, scale, r, residual_gate=gate)
    assert torch.equal(x_new, torch.addcmul(x, gate, r))
    assert torch.equal(h, norm_ops.norm_modulate(ln, torch.addcmul(x, gate, r), shift, scale)[1])
    x_q, rows = norm_modulate_fp8(ln, x, shift, scale, r, residual_gate=gate)
    q, s = quantize_fp8_rows_reference(h.reshape(-1, 8))
    assert torch.equal(x_q, x_new) and torch.equal(rows.q.view(torch.uint8), q.view(torch.uint8))
    with pytest.raises(InputError, match="needs a residual"):
        norm_ops.norm_modulate(ln, x, shift, scale, residual_gate=gate)


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
    # the passes writing fp8 rows follow the same rules, for every input that autograd could need
    y, mod = torch.randn(2, 5, 8), torch.randn(2, 1, 8)
    if HAS_TRITON:
        assert norm_ops.norm_quantizer(plain, y, mod, mod, enabled=True) is not None
        assert norm_ops.residual_quantizer(y, mod, y, enabled=True) is not None
    assert norm_ops.norm_quantizer(hooked, y, mod, mod, enabled=True) is None
    assert norm_ops.norm_quantizer(plain, y, mod.clone().requires_grad_(), mod, enabled=True) is None
    assert norm_ops.residual_quantizer(y, mod.clone().requires_grad_(), y, enabled=True) is None
    assert norm_ops.residual_quantizer(y, mod.bfloat16(), y, enabled=True) is None  # addcmul would promote
    assert norm_ops.residual_quantizer(y, mod, y, enabled=False) is None
    if HAS_TRITON:
        assert norm_ops.norm_quantizer(plain, y, mod, mod, y, enabled=True, residual_gate=mod) is not None
    assert norm_ops.norm_quantizer(plain, y, mod, mod, y, enabled=True, residual_gate=mod.double()) is None
    assert norm_ops.norm_quantizer(plain, y, mod, mod, y, enabled=True,
                                   residual_gate=mod.clone().requires_grad_()) is None


def test_dispatch_switch_follows_the_environment():
    switch = os.environ.get("SANAFLOW_FUSED_NORM")
    assert norm_ops.FUSED_NORM == (switch is None or switch.lower() not in ("0", "false", "off", "no"))


def test_prequantize_leaves_other_layers_and_cpu_alone():
    x = torch.randn(2, 3, 8)
    lin = nn.Linear(8, 4)
    assert prequantize(x, lin, lin) is x  # not fp8 layers
    assert not isinstance(prequantize(x), Fp8Rows)  # CPU tokens
    rows = Fp8Rows(*quantize_fp8_rows_reference(x.reshape(-1, 8)), x.shape, x.dtype)
    assert prequantize(rows, lin) is rows  # already quantized: passed through


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


def _assert_fp8_rows_close(q: torch.Tensor, q_ref: torch.Tensor) -> None:
    """fp8 values equal but on under 1e-4 of the elements, and those one e4m3 step (3 mantissa bits) apart."""
    differ = q.float() != q_ref.float()
    assert differ.float().mean().item() < 1e-4
    step = q_ref.float().abs()[differ] * 2.0**-3 + 2.0**-9
    assert ((q.float() - q_ref.float()).abs()[differ] <= step).all()


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_norm_to_fp8_rows_equals_norm_then_quantize(residual):
    _gpu_ready()
    g = torch.Generator("cuda").manual_seed(2)
    B, N, D = 2, 4096, 2240  # the 1600M width
    x = (torch.randn(B, N, D, device="cuda", generator=g) * 3).bfloat16()
    r = torch.randn(B, N, D, device="cuda", generator=g).bfloat16() if residual else None
    mod = torch.randn(B, 6, D, device="cuda", generator=g).bfloat16()
    shift, scale = mod[:, 3:4], mod[:, 4:5]
    x_new, q, s = norm_modulate_quantize(x, shift, scale, 1e-6, r, FP8_DTYPE, FP8_MAX, _SCALE_MIN)
    x_ref, h = norm_modulate(x, shift, scale, 1e-6, r)  # the unfused path: bf16 h, then the row quantisation
    q_k, s_k = quantize_rows(h.reshape(-1, D), FP8_DTYPE, FP8_MAX, _SCALE_MIN)
    assert q.shape == (B * N, D) and q.dtype == FP8_DTYPE and s.shape == (B * N, 1)
    assert torch.equal(x_new, x_ref)
    assert torch.equal(s, s_k)  # bit for bit: h rounded to bf16, then the same arithmetic
    # The values: the same, but for a division rounded apart on rare elements (the compiled kernels
    # need not round x / scale alike: the first H200 run found bytes apart), one fp8 step at most.
    _assert_fp8_rows_close(q, q_k)
    q_ref, s_ref = quantize_fp8_rows_reference(h.reshape(-1, D))
    assert torch.equal(s, s_ref)
    mismatch = (q.float() != q_ref.float()).float().mean().item()
    assert mismatch < 1e-4, mismatch  # as quantize_rows vs the torch reference: a division rounding apart


def _gated_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 CUDA tokens x, y (2, 4096, 2240: the 1600M width) and a modulation (2, 6, 2240)."""
    _gpu_ready()
    g = torch.Generator("cuda").manual_seed(seed)
    B, N, D = 2, 4096, 2240
    x = (torch.randn(B, N, D, device="cuda", generator=g) * 4).bfloat16()
    y = torch.randn(B, N, D, device="cuda", generator=g).bfloat16()
    return x, y, torch.randn(B, 6, D, device="cuda", generator=g).bfloat16()


def _assert_fma_close(x_new: torch.Tensor, ref: torch.Tensor) -> None:
    """A kernel's fused multiply-add against torch's CUDA addcmul (which rounds the product first):
    bf16 results one ulp apart at the rare float32 rounding ties, else equal."""
    diff = (x_new.float() - ref.float()).abs()
    assert (diff > 0).float().mean().item() < 1e-4
    assert torch.all(diff <= 2**-7 * ref.float().abs())


@pytest.mark.gpu
def test_gpu_norm_with_a_gated_residual_matches_addcmul_then_norm():
    x, y, mod = _gated_inputs(5)
    shift, scale, gate = mod[:, 0:1], mod[:, 1:2], mod[:, 5:6]
    x_new, h = norm_modulate(x, shift, scale, 1e-6, y, gate)
    _assert_fma_close(x_new, torch.addcmul(x, gate, y))
    _, h_k = norm_modulate(x_new, shift, scale, 1e-6)  # the norm of the stored stream, ungated
    assert torch.equal(h, h_k)
    xq, q, s = norm_modulate_quantize(x, shift, scale, 1e-6, y, FP8_DTYPE, FP8_MAX, _SCALE_MIN, residual_gate=gate)
    _, q_k, s_k = norm_modulate_quantize(x_new, shift, scale, 1e-6, None, FP8_DTYPE, FP8_MAX, _SCALE_MIN)
    assert torch.equal(xq, x_new) and torch.equal(s, s_k)
    _assert_fp8_rows_close(q, q_k)  # a division rounded apart on rare elements, one fp8 step at most


@pytest.mark.gpu
def test_gpu_gated_residual_to_fp8_rows_matches_addcmul_then_quantize():
    x, y, mod = _gated_inputs(3)
    gate, D = mod[:, 2:3], x.shape[-1]
    x_new, q, s = gated_residual_quantize(x, gate, y, FP8_DTYPE, FP8_MAX, _SCALE_MIN)
    ref = torch.addcmul(x, gate, y)
    _assert_fma_close(x_new, ref)
    q_k, s_k = quantize_rows(x_new.reshape(-1, D), FP8_DTYPE, FP8_MAX, _SCALE_MIN)
    assert torch.equal(s, s_k) and torch.equal(q.view(torch.uint8), q_k.view(torch.uint8))
    q_ref, s_ref = quantize_fp8_rows_reference(ref.reshape(-1, D))
    assert (s != s_ref).float().mean().item() < 1e-3  # a row whose max element sits on such a tie
    assert (q.float() != q_ref.float()).float().mean().item() < 1e-4


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
