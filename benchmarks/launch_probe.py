"""Host cost of one call (microseconds, no sync between calls) of the ops a SANA block launches in eager CUDA
inference: Triton launches by argument count, our norm / linear-attention wrappers and their parts,
F.linear against an nn.Linear module call (issue 7: the 600M 1024 px eager step is bound by the host).

    PYTHONPATH=src python benchmarks/launch_probe.py OUT.json      # CUDA only, ~10 s
"""
import json
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from _common import host_microseconds

from sanaflow.ops import norm as norm_ops
from sanaflow.ops import triton_linear_attention as tla
from sanaflow.ops import triton_norm as tn
from sanaflow.ops.linear_attention import linear_attention

print("triton", triton.__version__, "torch", torch.__version__)
dev = torch.device("cuda")
dt = torch.bfloat16
res = {}
def cost(name, fn, n=400):
    res[name] = round(host_microseconds(fn, n)[0], 2)
    print(f"{name:45s} {res[name]:8.2f} us", flush=True)
@triton.jit
def k1(a):
    pass
@triton.jit
def k8(a, b, c, d, e, f, g, h):
    pass
@triton.jit
def k8i(a, b, c, d, n1, n2, n3, n4):
    pass
@triton.jit
def k21(a, b, c, d, e, f, g, h, i1, i2, f1, i3, i4, i5, i6, i7, i8, i9, i10, i11, i12, X: tl.constexpr, Y: tl.constexpr):
    pass
x = torch.randn(2, 1024, 1152, device=dev, dtype=dt)
sh = torch.randn(2, 1, 1152, device=dev, dtype=dt)
cost("empty (2,1024,1152)", lambda: torch.empty(x.shape, device=dev, dtype=dt))
cost("empty_like", lambda: torch.empty_like(x))
cost("current_stream", lambda: torch.cuda.current_stream())
cost("triton 1 ptr", lambda: k1[(1,)](x))
cost("triton 8 ptr", lambda: k8[(1,)](x, x, x, x, x, x, x, x))
cost("triton 4 ptr 4 int", lambda: k8i[(1,)](x, x, x, x, 1024, 1152, 7, 3))
cost("triton 8 ptr 12 int 1 float 2 constexpr", lambda: k21[(1,)](x, x, x, x, x, x, x, x, 1024, 1152, 1e-6, 1152, 7, 1152, 9, 1152, 1152, 6912, 6912, 1152, 1152, X=True, Y=False))
ln = torch.nn.LayerNorm(1152, elementwise_affine=False, eps=1e-6).to(dev)
cost("norm_ops.norm_modulate", lambda: norm_ops.norm_modulate(ln, x, sh, sh))
cost("norm_ops.norm_modulate + gated residual", lambda: norm_ops.norm_modulate(ln, x, sh, sh, x, residual_gate=sh))
cost("triton_norm.norm_modulate", lambda: tn.norm_modulate(x, sh, sh, 1e-6))
args = tn._norm_inputs(x, sh, sh, None, None)
h = torch.empty_like(x)
cost("_norm_inputs", lambda: tn._norm_inputs(x, sh, sh, None, None))
cost("_launch_norm", lambda: tn._launch_norm(*args[:3], 1e-6, None, None, h, None, 1.0, 1.0))
cost("norm_fusable", lambda: norm_ops._norm_fusable(ln, x, sh, sh, None, None, None))
q = torch.randn(2, 1024, 36, 32, device=dev, dtype=dt).transpose(1, 2)
cost("linear_attention", lambda: linear_attention(q, q, q))
cost("linear_attention_triton", lambda: tla.linear_attention_triton(q, q, q))
cost("_LinearAttention.apply", lambda: tla._LinearAttention.apply(q, q, q, 1e-15))
with torch.inference_mode():
    cost("linear_attention (inference_mode)", lambda: linear_attention(q, q, q))
cost("_forward", lambda: tla._forward(q, q, q, 1e-15))
cost("_kv_forward", lambda: tla._kv_forward(q, q))
cost("_check", lambda: tla._check(q, q, q))
print("splits", tla._splits(72, 1024, True))
kv = torch.randn(72, 4, 32, 32, device=dev)
cost("kv.sum(1)", lambda: kv.sum(1))
w = torch.randn(1152, 1152, device=dev, dtype=dt)

cost("F.linear", lambda: F.linear(x, w))
lin = torch.nn.Linear(1152, 1152, bias=False).to(dev, dt)
cost("nn.Linear module", lambda: lin(x))
w3 = torch.randn(3 * 1152, 1152, device=dev, dtype=dt)
cost("F.linear 3x wide", lambda: F.linear(x, w3))
json.dump(res, open(sys.argv[1], "w"), indent=1)
