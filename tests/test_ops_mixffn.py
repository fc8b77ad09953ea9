"""Fused Mix-FFN middle (SiLU, depthwise 3x3 + bias, GLU) in Triton vs the model's torch path.

On CPU the kernel runs in Triton's interpreter, which must be switched on before triton is first
imported, so those checks run in a subprocess with ``TRITON_INTERPRET=1`` (one process, all cases,
tiny sizes: the interpreter is slow) and report relative errors as JSON. The oracle is
`GLUMBConv.dwconv_glu` (the path the model runs without the kernel) in float64 on the same
inputs. The same checks at the 1600M model's width and 4096 px run on a GPU (``gpu``).
"""

from __future__ import annotations

import os

import pytest
import torch

from sanaflow.errors import InputError
from sanaflow.models.sana_transformer import GLUMBConv
from sanaflow.ops import mixffn
from sanaflow.ops.triton_mixffn import fused_dwconv_glu
from triton_interp import HAS_TRITON, interpreter_fixture

# Runs in a fresh interpreter with TRITON_INTERPRET=1; prints one JSON object of relative errors.
_INTERPRETER_SCRIPT = r"""
import copy, json, torch
from sanaflow.models.sana_transformer import GLUMBConv
from sanaflow.ops.triton_mixffn import fused_dwconv_glu, _interpreting

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

def case(B, H, W, dim, ratio, dtype, seed, rows=32, bias=True, strided=False, scale=1.0, gather=False, stages=None):
    torch.manual_seed(seed)
    mod = GLUMBConv(dim, ratio)
    if not bias:
        mod.conv_depth.bias = None
    with torch.no_grad():  # larger depthwise weights than the default init: a harder check
        mod.conv_depth.weight.normal_(0, 0.5)
        if bias:
            mod.conv_depth.bias.normal_(0, 0.5)
    C = mod.conv_depth.weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    if strided:  # a channel slice of a wider projection: token stride != channel count
        a = (torch.randn(B, H * W, C + 24, generator=g) * scale)[..., 5:5 + C]
    else:
        a = torch.randn(B, H * W, C, generator=g) * scale
    a = a.to(dtype)
    mod_same = copy.deepcopy(mod).to(dtype)
    with torch.no_grad():
        out = fused_dwconv_glu(a, mod_same.conv_depth.weight, mod_same.conv_depth.bias, H, W, rows_per_program=rows,
                               gather=gather, stages=stages)
        ref = copy.deepcopy(mod).double().dwconv_glu(a.double(), H, W)  # oracle: float64, same rounded inputs
        ref_same = mod_same.dwconv_glu(a, H, W)  # what the model computes without the kernel
    return {"dtype": str(out.dtype), "shape": list(out.shape), "ref_shape": list(ref.shape),
            "finite": bool(torch.isfinite(out).all()), "out": rel(out, ref), "vs_same_dtype": rel(out, ref_same)}

res = {"interpreting": _interpreting()}
res["fp32_odd"] = case(2, 5, 7, 8, 2.5, torch.float32, 1)  # h = 20: one partial channel block
res["fp32_strips"] = case(1, 9, 20, 28, 2.5, torch.float32, 2, rows=4)  # 3 strips, 2 column and channel blocks
res["fp32_strided_no_bias"] = case(1, 6, 3, 8, 2.0, torch.float32, 3, bias=False, strided=True)
res["fp32_one_row"] = case(1, 1, 6, 4, 2.0, torch.float32, 4)
res["fp32_one_column"] = case(1, 7, 1, 4, 2.0, torch.float32, 5, rows=3)
res["fp32_large_values"] = case(1, 4, 5, 4, 2.0, torch.float32, 6, scale=30.0)  # SiLU saturation both ways
res["bf16"] = case(2, 6, 5, 16, 2.5, torch.bfloat16, 7)
res["fp16"] = case(1, 5, 6, 8, 2.5, torch.float16, 8)
# the tl.gather variant: tiles of 16 columns overlapping by two (W = 33: three column tiles)
res["fp32_gather_strips"] = case(1, 7, 33, 28, 2.5, torch.float32, 9, rows=3, gather=True)
res["fp32_gather_one_column"] = case(1, 5, 1, 4, 2.0, torch.float32, 10, gather=True)
res["bf16_gather"] = case(2, 6, 5, 16, 2.5, torch.bfloat16, 11, gather=True)
# the software-pipelined sweep (the interpreter runs tl.range as a plain loop: this checks its bounds)
res["fp32_stages_strips"] = case(1, 9, 20, 28, 2.5, torch.float32, 12, rows=4, stages=3)
print("RESULT" + json.dumps(res))
"""

FP32_CASES = ["fp32_odd", "fp32_strips", "fp32_strided_no_bias", "fp32_one_row", "fp32_one_column",
              "fp32_large_values", "fp32_gather_strips", "fp32_gather_one_column", "fp32_stages_strips"]


interpreter_results = interpreter_fixture(_INTERPRETER_SCRIPT)


def test_interpreter_is_really_used(interpreter_results):
    assert interpreter_results["interpreting"] is True


@pytest.mark.parametrize("name", FP32_CASES)
def test_interpreter_fp32_matches_model_path(interpreter_results, name):
    r = interpreter_results[name]
    assert r["finite"] and r["shape"] == r["ref_shape"]
    assert r["dtype"] == "torch.float32"
    assert r["out"] < 1e-5, (name, r["out"])  # float32 arithmetic throughout
    assert r["vs_same_dtype"] < 1e-5, (name, r["vs_same_dtype"])


@pytest.mark.parametrize("name, dtype, bound", [("bf16", "bfloat16", 1e-2), ("fp16", "float16", 2e-3),
                                               ("bf16_gather", "bfloat16", 1e-2)])
def test_interpreter_half_matches_model_path(interpreter_results, name, dtype, bound):
    r = interpreter_results[name]
    assert r["finite"] and r["shape"] == r["ref_shape"]
    assert r["dtype"] == f"torch.{dtype}"
    assert r["out"] < bound, (name, r["out"])  # only the final rounding: fp32 inside
    # the torch path rounds s, the conv output and silu(gate) to the half dtype: a little further off
    assert r["vs_same_dtype"] < bound, (name, r["vs_same_dtype"])


def test_bad_inputs_are_refused():
    w, b = torch.randn(8, 1, 3, 3), torch.randn(8)
    with pytest.raises(InputError, match="grid"):
        fused_dwconv_glu(torch.randn(1, 12, 8), w, b, 3, 5)
    with pytest.raises(InputError, match="even"):
        fused_dwconv_glu(torch.randn(1, 12, 7), torch.randn(7, 1, 3, 3), None, 3, 4)
    with pytest.raises(InputError, match=r"\(8, 1, 3, 3\)"):
        fused_dwconv_glu(torch.randn(1, 12, 8), torch.randn(8, 1, 5, 5), b, 3, 4)
    with pytest.raises(InputError, match="bias"):
        fused_dwconv_glu(torch.randn(1, 12, 8), w, torch.randn(4), 3, 4)
    with pytest.raises(InputError, match="float32"):
        fused_dwconv_glu(torch.randn(1, 12, 8).double(), w, b, 3, 4)
    with pytest.raises(InputError, match="rows_per_program"):
        fused_dwconv_glu(torch.randn(1, 12, 8), w, b, 3, 4, rows_per_program=0)
    with pytest.raises(InputError, match="stages"):
        fused_dwconv_glu(torch.randn(1, 12, 8), w, b, 3, 4, stages=0)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cpu_tensors_outside_the_interpreter_are_refused():
    # this process imported triton without TRITON_INTERPRET (unless the user set it for the whole run)
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the whole run uses Triton's interpreter")
    with pytest.raises(InputError, match="CUDA"):
        fused_dwconv_glu(torch.randn(1, 12, 8), torch.randn(8, 1, 3, 3), torch.randn(8), 3, 4)


def test_dispatch_is_on_by_default_and_cuda_only():
    switch = os.environ.get("SANAFLOW_FUSED_MIXFFN")
    assert mixffn.FUSED_MIXFFN == (switch is None or switch.lower() not in ("0", "false", "off", "no"))
    h, w = torch.randn(1, 12, 8), torch.randn(8, 1, 3, 3)
    assert mixffn.fused_mixffn_fn(h, w, enabled=True) is None  # CPU tensors: always the torch path
    assert mixffn.fused_mixffn_fn(h, w, enabled=False) is None


def test_model_on_cpu_keeps_the_torch_path_when_switched_on(monkeypatch):
    mod = GLUMBConv(8, 2.5)
    x = torch.randn(2, 15, 8)
    with torch.no_grad():
        before = mod.forward_tokens(x, 3, 5)
        monkeypatch.setattr(mixffn, "FUSED_MIXFFN", True)
        after = mod.forward_tokens(x, 3, 5)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # and the split into dwconv_glu is the module's grid forward
    grid = x.transpose(1, 2).unflatten(2, (3, 5))  # (B, D, H, W)
    torch.testing.assert_close(mod(grid).flatten(2).transpose(1, 2), before)


# ------------------------------------------------------------------------------------------------
# GPU: the real sizes (1600M: width 2240, mlp_ratio 2.5 -> h = 5600; 4096 px -> a 128 x 128 grid)
# ------------------------------------------------------------------------------------------------

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _gpu_module(dim: int, dtype: torch.dtype, seed: int) -> GLUMBConv:
    torch.manual_seed(seed)
    mod = GLUMBConv(dim, 2.5).cuda()
    with torch.no_grad():
        mod.conv_depth.weight.normal_(0, 0.5)
        mod.conv_depth.bias.normal_(0, 0.5)
    return mod.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("gather, stages", [(False, None), (True, None), (False, 1), (False, 3)])
def test_gpu_bf16_1600m_4096px_matches_model_path(gather, stages):
    mod = _gpu_module(2240, torch.bfloat16, 0)
    H = W = 128
    a = torch.randn(2, H * W, 2 * 5600, device="cuda", dtype=torch.bfloat16)  # (B, N, 2h), CFG batch 2
    with torch.no_grad():
        out = fused_dwconv_glu(a, mod.conv_depth.weight, mod.conv_depth.bias, H, W, gather=gather, stages=stages)
        ref_same = mod.dwconv_glu(a, H, W)
        ref32 = mod.float().dwconv_glu(a.float(), H, W)  # float32 oracle on the same bf16 inputs
    assert out.shape == (2, H * W, 5600) and out.dtype == torch.bfloat16
    assert _rel(out, ref32) < 1e-2
    assert _rel(out, ref_same) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("gather, stages", [(False, None), (True, None), (False, 1), (False, 3)])
def test_gpu_fp32_matches_float64(gather, stages):
    mod = _gpu_module(2240, torch.float32, 1)
    H, W = 45, 67  # odd, non-square, several strips and column blocks
    a = torch.randn(1, H * W, 2 * 5600, device="cuda")
    with torch.no_grad():
        out = fused_dwconv_glu(a, mod.conv_depth.weight, mod.conv_depth.bias, H, W, gather=gather, stages=stages)
        ref = mod.double().dwconv_glu(a.double(), H, W)
    assert _rel(out, ref) < 1e-5


@pytest.mark.gpu
def test_gpu_model_dispatch_inference_only(monkeypatch):
    monkeypatch.setattr(mixffn, "FUSED_MIXFFN", True)
    mod = _gpu_module(64, torch.bfloat16, 2)
    x = torch.randn(2, 12 * 10, 64, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(2, 120, 2 * 160, device="cuda", dtype=torch.bfloat16)
    assert mixffn.fused_mixffn_fn(a, mod.conv_depth.weight) is None  # params require grad, grad mode on
    with torch.no_grad():
        assert mixffn.fused_mixffn_fn(a, mod.conv_depth.weight) is fused_dwconv_glu
        fused = mod.forward_tokens(x, 12, 10)
        monkeypatch.setattr(mixffn, "FUSED_MIXFFN", False)
        ref = mod.forward_tokens(x, 12, 10)
    assert _rel(fused, ref) < 1e-2
    monkeypatch.setattr(mixffn, "FUSED_MIXFFN", True)
    out = mod.forward_tokens(x, 12, 10)  # training: the torch path, with a graph
    assert out.requires_grad and out.grad_fn is not None


@pytest.mark.gpu
def test_gpu_fused_path_compiles_fullgraph(monkeypatch):
    monkeypatch.setattr(mixffn, "FUSED_MIXFFN", True)
    mod = _gpu_module(64, torch.bfloat16, 3)
    x = torch.randn(2, 12 * 10, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = mod.forward_tokens(x, 12, 10)
        compiled = torch.compile(mod.forward_tokens, fullgraph=True)(x, 12, 10)
    assert _rel(compiled, eager) < 1e-2


def test_fast_silu_formula_matches_silu():
    # The kernel's half-precision SiLU is 0.5 v (1 + tanh(v / 2)) (tanh on the GPU's tanh.approx,
    # checked by the GPU tests); the identity itself, over the range bf16 activations take:
    v = torch.linspace(-60, 60, 20001, dtype=torch.float64)
    half = 0.5 * v
    torch.testing.assert_close(half + half * torch.tanh(half), torch.nn.functional.silu(v), rtol=1e-12, atol=1e-12)
