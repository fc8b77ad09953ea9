"""Fused Triton linear attention vs the torch reference.

On CPU the kernels run in Triton's interpreter, which must be switched on before triton is first
imported, so those checks run in a subprocess with ``TRITON_INTERPRET=1`` (one process, all cases)
and report relative errors as JSON. The same checks at SANA's real sizes run on a GPU (``gpu``).

The output pass that writes fp8 rows (`linear_attention_quantize`, for an fp8 output projection) is
checked against the unfused path: the attention kernel's output, heads merged, quantized by
`quantize_rows` and by the torch reference. The interpreter does not round to float8 as the GPU does
(see tests/test_ops_norm.py), so on CPU the kernel writes float32 and torch casts to float8.
"""

from __future__ import annotations

import pytest
import torch

from sanaflow.errors import InputError
from sanaflow.ops import linear_attention as attention_ops
from sanaflow.ops.linear_attention import linear_attention_reference
from sanaflow.ops.triton_linear_attention import linear_attention_quantize, linear_attention_triton
from sanaflow.quant.layers import (
    _SCALE_MIN,
    FP8_DTYPE,
    FP8_MAX,
    linear_attention_fp8,
    quantize_fp8_rows_reference,
)
from triton_interp import HAS_TRITON, interpreter_fixture

# Runs in a fresh interpreter with TRITON_INTERPRET=1; prints one JSON object of relative errors.
_INTERPRETER_SCRIPT = r"""
import json, torch
from sanaflow.ops.linear_attention import linear_attention_reference
from sanaflow.ops.triton_linear_attention import linear_attention_triton, triton_interpreting

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

def case(B, H, N, M, d, dtype, heads_last, seed, v_mean=0.0):
    g = torch.Generator().manual_seed(seed)
    if heads_last:  # views of (B, N, H*d) projections, as the transformer passes them
        q = torch.randn(B, N, H * d, generator=g).to(dtype).view(B, N, H, d).transpose(1, 2)
        k = torch.randn(B, M, H * d, generator=g).to(dtype).view(B, M, H, d).transpose(1, 2)
        v = (torch.randn(B, M, H * d, generator=g) + v_mean).to(dtype).view(B, M, H, d).transpose(1, 2)
    else:
        q, k, v = (torch.randn(B, H, n, d, generator=g).to(dtype) for n in (N, M, M))
        v = (v.float() + v_mean).to(dtype)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = linear_attention_triton(q, k, v)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(grad)
    # oracle: the reference in float64 on the same (rounded) inputs
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = linear_attention_reference(q64, k64, v64)
    ref.backward(grad.double())
    # same-dtype reference: what the model computes today without the fused kernel
    ref_same = linear_attention_reference(q.detach(), k.detach(), v.detach())
    return {
        "dtype": str(dtype), "out_dtype": str(out.dtype), "shape": list(out.shape),
        "finite": bool(torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))),
        "out": rel(out, ref), "out_vs_same_dtype_ref": rel(out, ref_same),
        "dq": rel(q.grad, q64.grad), "dk": rel(k.grad, k64.grad), "dv": rel(v.grad, v64.grad),
        "grad_shapes_ok": all(t.grad.shape == t.shape for t in (q, k, v)),
    }

res = {"interpreting": triton_interpreting()}
res["fp32_heads_last"] = case(2, 3, 200, 200, 32, torch.float32, True, 1)
res["fp32_cross_lengths"] = case(1, 2, 300, 130, 32, torch.float32, False, 2)  # M != N, several splits
res["fp32_one_head_split"] = case(1, 1, 300, 520, 32, torch.float32, True, 3)  # 2 splits, 3 blocks each
res["fp32_head_dim_24"] = case(1, 2, 70, 33, 24, torch.float32, False, 4)  # padded head dim
res["fp32_shifted_values"] = case(1, 2, 200, 200, 32, torch.float32, True, 7, v_mean=3.0)  # cancelling grads
res["bf16"] = case(2, 3, 150, 150, 32, torch.bfloat16, True, 5)
res["fp16"] = case(1, 2, 150, 90, 32, torch.float16, True, 6)
# queries whose features are all negative: relu -> 0, output 0 (eps keeps it finite), like the reference
q = -torch.rand(1, 1, 20, 32) - 0.1
k, v = torch.randn(1, 1, 20, 32), torch.randn(1, 1, 20, 32)
res["dead_query_max_abs"] = linear_attention_triton(q, k, v).abs().max().item()

# the output pass writing fp8 rows vs the unfused path: the output kernel's out, heads merged, then
# quantize_rows / the torch reference (float32 store: the interpreter's float8 store is wrong)
from sanaflow.ops.triton_norm import quantize_rows
from sanaflow.quant.layers import quantize_fp8_rows_reference, FP8_MAX, _SCALE_MIN
from sanaflow.ops.triton_linear_attention import linear_attention_quantize

def eq_bytes(a, b):
    return bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))

def quant_case(B, H, N, M, d, dtype, heads_last, seed):
    g = torch.Generator().manual_seed(seed)
    if heads_last:
        q, k, v = (torch.randn(B, n, H * d, generator=g).to(dtype).view(B, n, H, d).transpose(1, 2) for n in (N, M, M))
    else:
        q, k, v = (torch.randn(B, H, n, d, generator=g).to(dtype) for n in (N, M, M))
    v = (v.float() * 3 + 0.5).to(dtype)
    q[0, :, 1] = -q[0, :, 1].abs() - 0.1  # a dead token in every head: an all-zero row
    with torch.no_grad():
        values, s = linear_attention_quantize(q, k, v, torch.float32, FP8_MAX, _SCALE_MIN)
        out = linear_attention_triton(q, k, v).transpose(1, 2).reshape(B * N, H * d)  # the unfused output
    q_k, s_k = quantize_rows(out, torch.float32, FP8_MAX, _SCALE_MIN)
    q_ref, s_ref = quantize_fp8_rows_reference(out)
    # the torch attention reference (another accumulation order): its rows within one rounding of q's dtype
    q_t, s_t = quantize_fp8_rows_reference(linear_attention_reference(q, k, v).transpose(1, 2).reshape(B * N, H * d))
    fp8 = values.to(torch.float8_e4m3fn)
    return {"shapes": [list(values.shape), list(s.shape)], "scale_vs_kernel": bool(torch.equal(s, s_k)),
            "values_vs_kernel": bool(torch.equal(values, q_k)), "scale_vs_reference": bool(torch.equal(s, s_ref)),
            "fp8_vs_reference": eq_bytes(fp8, q_ref), "max_abs": values.abs().max().item(),
            "scale_vs_torch": ((s - s_t).abs() / s_t).max().item(),
            # in fp8 steps: |a - b| / (max(|a|, |b|) 2**-3 + 2**-9), e4m3 having 3 mantissa bits
            "fp8_vs_torch_steps": ((fp8.float() - q_t.float()).abs()
                                   / (torch.maximum(fp8.float().abs(), q_t.float().abs()) * 2**-3 + 2**-9)).max().item(),
            "zero_row": bool((values[1] == 0).all()) and 0 < s[1].item() < 1e-14}  # scale_min / qmax

res["q_bf16_heads_last"] = quant_case(2, 3, 200, 200, 32, torch.bfloat16, True, 8)  # N % 128 != 0, h*d = 96
res["q_fp32_head_dim_24"] = quant_case(1, 5, 130, 70, 24, torch.float32, False, 9)  # padded head dim, h*d = 120
res["q_fp16_cross_lengths"] = quant_case(2, 2, 90, 300, 32, torch.float16, True, 10)  # M != N, several splits

# an fp8 model whose self-attention output reaches to_out[0] as fp8 rows from the kernel, vs the
# unfused path through the same kernels (the attention's output, then the layer's row quantisation).
# torch's CPU _scaled_mm stands in for the GPU's: the fp8 device check is patched.
import functools
import sanaflow.models.sana_transformer as st
import sanaflow.quant as quant
import sanaflow.quant.layers as layers
from sanaflow.ops import norm as norm_ops, triton_linear_attention as tla

calls = []
kernel = tla.linear_attention_quantize
def float_store(q, k, v, dtype, qmax, scale_min):
    calls.append(1)
    values, s = kernel(q, k, v, torch.float32, qmax, scale_min)
    return values.to(dtype), s

tla.linear_attention_quantize = float_store  # before the dispatch first resolves it
layers._on_fp8_device = lambda t: True
quant.check_quantization = lambda mode, device: None
norm_ops.FUSED_NORM = True
st.linear_attention = linear_attention_triton  # the unfused path runs the same attention kernels
st.linear_attention_fp8 = functools.partial(layers.linear_attention_fp8, enabled=True)
wanted = st.fp8_rows_wanted
TINY = dict(in_channels=4, out_channels=4, attention_head_dim=16, caption_channels=32, sample_size=8,
            num_attention_heads=3, num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
            cross_attention_dim=48)  # width 48: h*d not a power of two
g = torch.Generator().manual_seed(11)
x, ctx = torch.randn(2, 4, 10, 13, generator=g), torch.randn(2, 5, 32, generator=g)  # N = 130 tokens
mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    torch.manual_seed(0)
    model = st.SanaTransformer(**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    qmodel = quant.quantize_transformer(model.to(dtype), "fp8")
    args = (x.to(dtype), ctx.to(dtype), torch.tensor([700.0, 20.0]))
    calls.clear()
    with torch.no_grad():
        st.fp8_rows_wanted = wanted
        fused = qmodel(*args, encoder_attention_mask=mask)
        n_calls = len(calls)
        st.fp8_rows_wanted = lambda x: False
        unfused = qmodel(*args, encoder_attention_mask=mask)
    res[f"fp8_model_{name}"] = {"exact": bool(torch.equal(fused, unfused)), "kernel_calls": n_calls,
                                "unfused_calls": len(calls) - n_calls, "finite": bool(torch.isfinite(fused).all())}
print("RESULT" + json.dumps(res))
"""


interpreter_results = interpreter_fixture(_INTERPRETER_SCRIPT)


FP32_CASES = ["fp32_heads_last", "fp32_cross_lengths", "fp32_one_head_split", "fp32_head_dim_24",
              "fp32_shifted_values"]


def test_interpreter_is_really_used(interpreter_results):
    assert interpreter_results["interpreting"] is True


@pytest.mark.parametrize("name", FP32_CASES)
def test_interpreter_fp32_forward_backward(interpreter_results, name):
    r = interpreter_results[name]
    assert r["finite"] and r["grad_shapes_ok"]
    assert r["out_dtype"] == "torch.float32"
    for key in ("out", "dq", "dk", "dv"):
        assert r[key] < 1e-5, (name, key, r[key])  # full fp32 arithmetic: far under the 1e-3 target


@pytest.mark.parametrize("name, bound", [("bf16", 1e-2), ("fp16", 2e-3)])
def test_interpreter_half_forward_backward(interpreter_results, name, bound):
    r = interpreter_results[name]
    assert r["finite"] and r["grad_shapes_ok"]
    assert r["out_dtype"] == f"torch.{'bfloat16' if name == 'bf16' else 'float16'}"
    for key in ("out", "dq", "dk", "dv"):
        assert r[key] < bound, (name, key, r[key])  # the half-precision rounding of the results
    # against the reference run in the same dtype only the final rounding may differ
    assert r["out_vs_same_dtype_ref"] < bound


def test_interpreter_dead_queries_give_zero(interpreter_results):
    assert interpreter_results["dead_query_max_abs"] == 0.0


QUANT_CASES = {"q_bf16_heads_last": (2, 200, 3 * 32), "q_fp32_head_dim_24": (1, 130, 5 * 24),
               "q_fp16_cross_lengths": (2, 90, 2 * 32)}


@pytest.mark.parametrize("name", sorted(QUANT_CASES))
def test_interpreter_attention_to_fp8_rows_equals_the_unfused_path(interpreter_results, name):
    r = interpreter_results[name]
    B, N, width = QUANT_CASES[name]
    assert r["shapes"] == [[B * N, width], [B * N, 1]]
    # Exact, no tolerance: the fused pass rounds each head's output to q's dtype before quantizing, so
    # it quantizes the very values the output kernel stores and the row quantisation reads back.
    assert r["scale_vs_kernel"] and r["values_vs_kernel"], r
    assert r["scale_vs_reference"] and r["fp8_vs_reference"], r
    assert r["max_abs"] <= FP8_MAX
    assert r["zero_row"], r  # a token dead in every head: values 0, the scale floor
    # against the torch attention (float32 sums in another order): scales one rounding of q's dtype apart
    # (half precision: an ulp of the row's max; float32: a few float32 roundings), values a step of fp8
    bound = {"q_bf16_heads_last": 2**-7, "q_fp16_cross_lengths": 2**-10, "q_fp32_head_dim_24": 1e-6}[name]
    assert r["scale_vs_torch"] <= bound, r
    assert r["fp8_vs_torch_steps"] <= 1.0, r


@pytest.mark.parametrize("name", ["fp8_model_fp32", "fp8_model_bf16"])
def test_interpreter_fp8_model_with_attention_rows_equals_the_unfused_path(interpreter_results, name):
    r = interpreter_results[name]
    assert r["kernel_calls"] == 2 and r["unfused_calls"] == 0, r  # one per block, fused run only
    # the same kernels either way, the fused output rows bit-identical: so is the model output
    assert r["exact"] and r["finite"], r


def test_bad_shapes_and_dtypes_are_input_errors():
    q = torch.randn(1, 2, 8, 32)
    with pytest.raises(InputError, match="heads"):
        linear_attention_triton(q, torch.randn(1, 3, 8, 32), torch.randn(1, 3, 8, 32))
    with pytest.raises(InputError, match="one dtype"):
        linear_attention_triton(q, q.half(), q)
    with pytest.raises(InputError, match="shape"):
        linear_attention_triton(q[0], q[0], q[0])
    with pytest.raises(InputError, match="float8"):
        linear_attention_quantize(q, q, q, torch.bfloat16, FP8_MAX, _SCALE_MIN)
    with pytest.raises(InputError, match="heads"):
        linear_attention_quantize(q, torch.randn(1, 3, 8, 32), torch.randn(1, 3, 8, 32), FP8_DTYPE, FP8_MAX,
                                  _SCALE_MIN)


def test_output_quantizer_dispatch_and_torch_fallback(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (10, 7, 7))
    # CPU tensors outside the interpreter, the switch, the torch backend, autograd: never the kernel
    assert attention_ops.output_quantizer(q, k, v) is None
    assert attention_ops.output_quantizer(q, k, v, enabled=False) is None
    if not HAS_TRITON or not attention_ops._interpreting():
        assert attention_ops.output_quantizer(q, k, v, enabled=True) is None  # CPU: only in the interpreter
    assert attention_ops.output_quantizer(q.clone().requires_grad_(), k, v, enabled=True) is None
    monkeypatch.setattr(attention_ops, "_backend", "torch")
    assert attention_ops.output_quantizer(q, k, v) is None
    # the torch path: the attention, heads merged, then the reference row quantisation
    rows = linear_attention_fp8(q, k, v)
    merged = linear_attention_reference(q, k, v).transpose(1, 2).reshape(20, 48)
    values, scale = quantize_fp8_rows_reference(merged)
    assert rows.shape == (2, 10, 48) and rows.dtype == q.dtype
    assert torch.equal(rows.scale, scale) and torch.equal(rows.q.view(torch.uint8), values.view(torch.uint8))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cpu_tensors_without_interpreter_are_refused():
    from sanaflow.ops.triton_linear_attention import triton_interpreting

    if triton_interpreting():
        pytest.skip("this process runs triton in interpreter mode")
    q = torch.randn(1, 2, 8, 32)
    with pytest.raises(InputError, match="CUDA"):
        linear_attention_triton(q, q, q)


# ----------------------------------------------------------------------------------------------
# GPU: SANA's real sizes (heads 36 / 70, head dim 32, CFG batch 2)
# ----------------------------------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(B, H, N, M, d, dtype, seed, v_mean=0.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # (B, N, H*d) projections viewed as (B, H, N, d), exactly as the transformer hands them over
    q = torch.randn(B, N, H * d, device="cuda", generator=g).to(dtype).view(B, N, H, d).transpose(1, 2)
    k = torch.randn(B, M, H * d, device="cuda", generator=g).to(dtype).view(B, M, H, d).transpose(1, 2)
    v = (torch.randn(B, M, H * d, device="cuda", generator=g) + v_mean).to(dtype).view(B, M, H, d).transpose(1, 2)
    return [t.detach().requires_grad_() for t in (q, k, v)]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B, H, N, M, dtype, v_mean, bound",
    [
        (2, 36, 1024, 1024, torch.float32, 0.0, 1e-3),  # 600M at 1024px
        (2, 70, 4096, 4096, torch.float32, 0.0, 1e-3),  # 1600M at 2048px
        (2, 70, 16384, 16384, torch.bfloat16, 0.0, 1e-2),  # 1600M at 4096px
        (2, 36, 65536, 65536, torch.bfloat16, 0.0, 1e-2),  # 600M, 65536 tokens
        (2, 70, 1000, 3000, torch.float16, 0.0, 5e-3),  # ragged, keys from several frames
        # values with a large mean: the two terms of dq / dk cancel, so tf32 dots would fail here
        (2, 70, 4096, 4096, torch.bfloat16, 3.0, 1e-2),
    ],
)
def test_gpu_matches_reference(B, H, N, M, dtype, v_mean, bound):
    q, k, v = _inputs(B, H, N, M, 32, dtype, seed=N + M, v_mean=v_mean)
    out = linear_attention_triton(q, k, v)
    grad = torch.randn_like(out)
    out.backward(grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = linear_attention_reference(q64, k64, v64)
    ref.backward(grad.double())
    assert out.dtype == dtype and out.shape == (B, H, N, 32)
    assert torch.isfinite(out).all()
    errors = {"out": _rel(out, ref), "dq": _rel(q.grad, q64.grad), "dk": _rel(k.grad, k64.grad),
              "dv": _rel(v.grad, v64.grad)}
    assert all(e < bound for e in errors.values()), errors


@pytest.mark.gpu
def test_gpu_compiles_fullgraph_and_is_deterministic():
    q, k, v = _inputs(2, 36, 4096, 4096, 32, torch.bfloat16, seed=7)

    def f(q, k, v):
        return linear_attention_triton(q, k, v).transpose(1, 2).flatten(2)  # (B, N, h*d)

    eager = f(q, k, v)
    again = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    assert torch.equal(eager, again)  # fixed reduction order: bitwise reproducible
    assert _rel(compiled, eager) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B, H, N, M, dtype",
    [
        (2, 70, 4096, 4096, torch.bfloat16),  # 1600M at 2048px
        (2, 36, 1000, 3000, torch.float16),  # 600M width, ragged, keys from several frames
    ],
)
def test_gpu_attention_to_fp8_rows_equals_attention_then_quantize(B, H, N, M, dtype):
    from sanaflow.ops.triton_norm import quantize_rows

    q, k, v = (t.detach() for t in _inputs(B, H, N, M, 32, dtype, seed=N + M + 1))
    values, s = linear_attention_quantize(q, k, v, FP8_DTYPE, FP8_MAX, _SCALE_MIN)
    out = linear_attention_triton(q, k, v).transpose(1, 2).reshape(B * N, H * 32)  # the unfused path
    q_k, s_k = quantize_rows(out, FP8_DTYPE, FP8_MAX, _SCALE_MIN)
    assert values.shape == (B * N, H * 32) and values.dtype == FP8_DTYPE and s.shape == (B * N, 1)
    # The scales bit for bit: each head's output is the same inlined code as the output kernel's,
    # rounded to q's dtype, then the row quantisation's arithmetic.
    assert torch.equal(s, s_k)
    # The values: the same but for a division rounded apart on rare elements (compiled kernels need not
    # round x / scale alike), one fp8 step at most.
    for other in (q_k, quantize_fp8_rows_reference(out)[0]):
        a, b = values.float(), other.float()
        differ = a != b
        assert differ.float().mean().item() < 1e-4
        assert ((a - b).abs()[differ] <= b.abs()[differ] * 2.0**-3 + 2.0**-9).all()
