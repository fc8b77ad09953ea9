"""The cross-attention custom op (compiled CUDA graphs keep its strided queries) against plain SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sanaflow.ops.cross_attention import _attend_tokens_op, attend_tokens
from triton_interp import HAS_TRITON, compile_for_gpu, interpreter_fixture


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, n, h, d, length = 2, 12, 3, 8, 7
    q = torch.randn(b, n, h * d, generator=g).unflatten(2, (h, d)).transpose(1, 2)  # strided (B, h, N, d) view
    k = torch.randn(b, h, length, d, generator=g)
    v = torch.randn(b, h, length, d, generator=g)
    mask = torch.ones(b, length)
    mask[1, 4:] = 0  # the second caption is shorter
    bias = ((1 - mask) * -1e4)[:, None, None, :]  # (B, 1, 1, L)
    return q, k, v, bias


def _direct(q, k, v, bias):
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias  # (B, h, N, L)
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)  # (B, N, h * d)


def test_op_and_cpu_path_match_a_direct_attention():
    q, k, v, bias = _inputs()
    want = _direct(q, k, v, bias)
    torch.testing.assert_close(attend_tokens(q, k, v, bias), want, rtol=1e-5, atol=1e-5)
    out = _attend_tokens_op(q, k, v, bias)  # the CUDA path's op, run on CPU tensors
    assert out.is_contiguous() and out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_attend_tokens_op(q, k, v, None), _direct(q, k, v, torch.zeros_like(bias)),
                               rtol=1e-5, atol=1e-5)


def test_op_registration_is_consistent():
    q, k, v, bias = _inputs(1)
    # schema, fake (meta) implementation and real outputs agree in shape, dtype and strides
    torch.library.opcheck(_attend_tokens_op, (q, k, v, bias), test_utils=("test_schema", "test_faketensor"))


def test_op_compiles_without_graph_breaks():
    q, k, v, bias = _inputs(2)
    fn = torch.compile(lambda *a: _attend_tokens_op(*a) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(q, k, v, bias), 2 * _direct(q, k, v, bias), rtol=1e-5, atol=1e-5)


# ---- the Triton kernel (sanaflow.ops.triton_cross_attention) -------------------------------------

# Runs in a fresh interpreter with TRITON_INTERPRET=1; prints one JSON object of relative errors.
_INTERPRETER_SCRIPT = r"""
import json, torch
import torch.nn.functional as F
from sanaflow.ops.triton_cross_attention import cross_attention_triton, _INTERPRETING

def direct(q, k, v, bias):  # float64 softmax attention -> (B, N, h * d)
    s = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        s = s + bias.double()
    return (s.softmax(-1) @ v.double()).transpose(1, 2).flatten(2)

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

def case(B, H, N, L, d, seed, masked=None, bias_shape="b11l", meta=None, inf_head=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H * d, generator=g).view(B, N, H, d).transpose(1, 2)  # strided view, as the model's
    k = torch.randn(B, H, L, d, generator=g)
    v = torch.randn(B, H, L, d, generator=g)
    bias = None
    if masked is not None:
        mask = torch.ones(B, L)
        for b, keep in enumerate(masked):
            mask[b, keep:] = 0
        bias = ((1 - mask) * -1e4)[:, None, None, :]
        if bias_shape == "l":
            bias = bias[:1]  # (1, 1, 1, L): one mask for the whole batch
        v = v + (1 - mask)[:, None, :, None] * 50.0  # padded tokens' values far off: a leak would show
        bias[..., :inf_head] = float("-inf")  # a boolean mask's -inf on the first keys
    out = cross_attention_triton(q, k, v, bias, meta=meta)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2)
    return {"shape_ok": list(out.shape) == [B, N, H * d], "contiguous": out.is_contiguous(),
            "vs_direct": rel(out, direct(q, k, v, bias)), "vs_sdpa": rel(out, sdpa)}

res = {"interpreting": _INTERPRETING}
res["d72_no_bias"] = case(2, 3, 40, 37, 72, 1)  # two head slices (64 + 16), several key blocks
res["d72_masked"] = case(2, 3, 40, 37, 72, 2, masked=(9, 30))  # whole masked blocks skipped
res["d112_masked"] = case(1, 2, 20, 70, 112, 3, masked=(20,))  # 64 + 64
res["d8_masked"] = case(2, 2, 17, 50, 8, 4, masked=(1, 50))  # one 16-wide slice, a single valid token
res["d32_bias_over_batch"] = case(2, 2, 21, 19, 32, 5, masked=(7, 7), bias_shape="l")
res["all_masked_row"] = case(2, 1, 9, 40, 24, 6, masked=(0, 5))  # row 0: the plain softmax, as SDPA's
res["inf_first_block"] = case(2, 1, 9, 40, 24, 8, masked=(0, 30), inf_head=16)  # row 0: -inf block, then -1e4
res["big_blocks"] = case(1, 2, 70, 40, 72, 7, masked=(33,), meta={"BLOCK_M": 64, "BLOCK_L": 32})
print("RESULT" + json.dumps(res))
"""

triton_results = interpreter_fixture(_INTERPRETER_SCRIPT)


def test_triton_kernel_runs_in_the_interpreter(triton_results):
    assert triton_results["interpreting"] is True


@pytest.mark.parametrize("name", ["d72_no_bias", "d72_masked", "d112_masked", "d8_masked", "d32_bias_over_batch",
                                  "big_blocks"])
def test_triton_kernel_matches_a_direct_attention(triton_results, name):
    r = triton_results[name]
    assert r["shape_ok"] and r["contiguous"]
    assert r["vs_direct"] < 2e-6, r  # float32 kernel vs float64 attention
    assert r["vs_sdpa"] < 2e-6, r


@pytest.mark.parametrize("name", ["all_masked_row", "inf_first_block"])
def test_triton_kernel_keeps_the_plain_softmax_of_an_all_masked_caption(triton_results, name):
    r = triton_results[name]
    # an all-padded caption has every bias -1e4: its softmax is the unmasked one (float32 rounds the
    # -1e4 offsets, so the error against float64 is ~1e-4 in SDPA as well)
    assert r["vs_sdpa"] < 5e-4 and r["vs_direct"] < 5e-4, r


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("d, bias, ptr, block, launch", [
    (72, True, "*bf16", (128, 64), (4, 3)),  # 600M, CFG mask: both head slices and the block skipping
    (112, True, "*bf16", (128, 128), (8, 2)),  # 1600M, the largest tiles of the autotuner
    (72, False, "*fp32", (64, 64), (4, 2)),  # float32, exact dots
])
def test_triton_kernel_compiles_for_hopper(d, bias, ptr, block, launch):
    # the interpreter runs any Python; the compiler is stricter (globals, dot sizes, shared memory):
    # building the sm_90 cubin here catches on CPU what would otherwise fail only on the GPU
    from sanaflow.ops.triton_cross_attention import head_slices

    d0, d1 = head_slices(d)
    consts = dict(HAS_BIAS=bias, BLOCK_M=block[0], BLOCK_L=block[1], D0=d0, D1=d1, UPCAST=False,
                  PRECISION="ieee" if ptr == "*fp32" else "tf32")
    done = compile_for_gpu("sanaflow.ops._cross_attention_kernels", "cross_attention_kernel", consts, ptr=ptr,
                           types={"qk_scale": "fp32"}, launch=[launch])
    assert done[0]["cubin"] > 0 and done[0]["shared"] <= 227 * 1024, done


def test_head_slices_cover_the_head_dim():
    from sanaflow.ops.triton_cross_attention import head_slices

    assert head_slices(72) == (64, 16) and head_slices(112) == (64, 64) and head_slices(64) == (64, 0)
    assert head_slices(8) == (16, 0) and head_slices(24) == (16, 16) and head_slices(256) == (256, 0)
    for d in range(1, 257):
        d0, d1 = head_slices(d)
        assert d0 + d1 >= d and d0 >= 16 and (d1 == 0 or d1 >= 16)
        assert d0 & (d0 - 1) == 0 and d1 & (d1 - 1) == 0 if d1 else d0 & (d0 - 1) == 0


def test_supports_and_errors():
    from sanaflow.errors import InputError
    from sanaflow.ops import triton_cross_attention as tca

    q, k, v, bias = _inputs(3)
    if tca.triton_available():
        assert tca.supports(q, k, v, bias) and tca.supports(q, k, v, None) and tca.supports(q, k, v, bias[0, 0, 0])
    assert not tca.supports(q, k, v, torch.zeros(2, 3, 12, 7))  # per-head, per-query bias: SDPA
    assert not tca.supports(q, k[:, :, :0], v[:, :, :0], None)
    assert not tca.supports(q, k.double(), v, None)
    with pytest.raises(InputError, match="at least one caption token"):
        tca.cross_attention_triton(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(InputError, match="k and v must be"):
        tca.cross_attention_triton(q, k[:, :2], v[:, :2])
    with pytest.raises(InputError, match="key-padding bias|CUDA tensors|needs triton"):
        tca.cross_attention_triton(q, k, v, torch.zeros(2, 3, 12, 7))


def test_backend_choice_is_checked():
    from sanaflow.errors import ConfigError
    from sanaflow.ops import cross_attention as ca

    with pytest.raises(ConfigError, match="cross-attention backend"):
        ca.set_backend("flash")
    q, k, v, bias = _inputs(4)
    try:
        ca.set_backend("triton")
        assert ca._triton_call(q, k, v, bias) is None  # CPU tensors: the kernel only runs on CUDA
        torch.testing.assert_close(attend_tokens(q, k, v, bias), _direct(q, k, v, bias), rtol=1e-5, atol=1e-5)
    finally:
        ca.set_backend("auto")
    assert ca._backend == "auto"


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["600M", "1600M"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernel_on_gpu_at_sana_sizes(model, dtype):
    from sanaflow.ops.triton_cross_attention import cross_attention_triton

    heads, d = {"600M": (16, 72), "1600M": (20, 112)}[model]
    g = torch.Generator(device="cuda").manual_seed(0)
    B, N, L = 2, 4096, 300
    q = torch.randn(B, N, heads * d, device="cuda", generator=g).to(dtype).view(B, N, heads, d).transpose(1, 2)
    k = torch.randn(B, heads, L, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, heads, L, d, device="cuda", generator=g).to(dtype)
    mask = torch.ones(B, L, device="cuda")
    mask[0, 120:] = 0
    bias = ((1 - mask) * -1e4).to(dtype)[:, None, None, :]
    out = cross_attention_triton(q, k, v, bias)
    ref = _direct(q.double(), k.double(), v.double(), bias.double())
    err = ((out.double() - ref).norm() / ref.norm()).item()
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2)
    err_sdpa = ((sdpa.double() - ref).norm() / ref.norm()).item()
    # float32: 1e-3 relative (the tensor cores' tf32 is not used: ieee dots); bf16: no worse than SDPA's rounding
    assert err < (1e-5 if dtype == torch.float32 else max(2 * err_sdpa, 1e-2)), (err, err_sdpa)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_model_with_the_triton_kernel_matches_sdpa(compiled):
    # A 600M-shaped block pair (cross heads 16 x 72) in bf16: our kernel vs SDPA inside the model.
    from sanaflow.models import SanaTransformer
    from sanaflow.ops import cross_attention as ca

    torch.manual_seed(0)
    model = SanaTransformer(in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32,
                            num_layers=2, num_cross_attention_heads=16, cross_attention_head_dim=72,
                            cross_attention_dim=1152, caption_channels=64, sample_size=32)
    model = model.to("cuda", torch.bfloat16).eval()
    x = torch.randn(2, 32, 32, 32, device="cuda", dtype=torch.bfloat16)
    caption = torch.randn(2, 300, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 300, device="cuda")
    mask[0, 40:] = 0
    t = torch.tensor([700.0, 30.0], device="cuda")
    fn = torch.compile(model, fullgraph=True) if compiled else model
    outs = {}
    try:
        for backend in ("torch", "triton"):
            ca.set_backend(backend)
            torch._dynamo.reset()
            with torch.inference_mode():
                outs[backend] = fn(x, caption, t, encoder_attention_mask=mask).float()
    finally:
        ca.set_backend("auto")
        torch._dynamo.reset()
    cos = F.cosine_similarity(outs["torch"].flatten(), outs["triton"].flatten(), dim=0).item()
    assert cos > 0.9999, cos
