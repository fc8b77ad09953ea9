"""Fused Mix-FFN middle in Triton: SiLU, depthwise 3x3 conv + bias, GLU gating in one pass (inference).

SANA's Mix-FFN (GLUMBConv) runs, between its two 1x1 convs, on a (B, N, 2h) activation ``a`` that
is a row-major (H, W) token grid, channels last:

    s = silu(a); c = depthwise_conv3x3(s, weight, bias, zero padding); out = c[..., :h] * silu(c[..., h:])

The torch path writes and re-reads ``s``, ``c`` and ``silu(gate)`` (about 6.5 passes over a
(B, N, 2h) tensor: ~4.8 GB per block at 4096 px with the 1600M model, CFG batch 2); `fused_dwconv_glu` reads
``a`` once (the column neighbours from cache) and writes the (B, N, h) result once, with float32
arithmetic inside. Forward only: the model uses it for inference (no autograd graph) on CUDA by
default (``SANAFLOW_FUSED_MIXFFN=0`` turns it off), see `sanaflow.ops.mixffn`.

Cost: each program sweeps a strip of rows;
every input row is loaded three times (columns shifted by -1, 0, +1; the shifted loads hit L1) and
SiLU'd at each load, since Triton has no register shift: ~7 SiLUs per output element. For half
precision tokens the SiLU is 0.5 v (1 + tanh(v / 2)) on the hardware's ``tanh.approx.f32`` (one SFU
instruction instead of an exp and a reciprocal), and the tile's in-row offsets and column masks are
computed once before the sweep: measured on an H100 (1600M width, 4096 px, CFG batch 2;
``benchmarks/results/mixffn_speed.json``) 1.53 -> 1.03 ms, 1,070 GB/s of the 1.1 GB it must move
(the torch path: 3.6 ms). float32 tokens keep the exact SiLU. The variant ``_GATHER = True`` does
one SiLU per loaded element (horizontal neighbours through `tl.gather`, at the price of
shared-memory shuffles and 2 of every BLOCK_W columns loaded twice); it measured slower. What held
the plain sweep at ~1.1 TB/s was latency, not instructions: Triton pipelines only loads that feed a
`tl.dot` unless the loop asks for it, so each row's loads waited for the previous row's arithmetic.
The sweep now runs as `tl.range(num_stages=3)` (session 15, H200: 0.98 -> 0.64 ms, 1.7 TB/s, with
64-row strips on tall grids; ``benchmarks/results/mixffn_speed_session15.txt``).

CPU tensors run the same kernel in Triton's interpreter (slow, for tests only); that needs
``TRITON_INTERPRET=1`` in the environment before triton is first imported.
"""

from __future__ import annotations

import torch

from ..errors import InputError

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_W = 16  # grid columns per program
_BLOCK_C = 64  # channels per program: 128 contiguous bytes per pixel in bf16
_ROWS = 32  # grid rows per program (each program also reads the row above and below its strip)
_ROWS_TALL = 64  # ... for grids of at least _TALL rows (4096 px: 128), where the programs still fill the GPU
_TALL = 128
_NUM_WARPS = 4
# Software-pipelining stages of the row sweep (1: a plain loop). Measured on an H200 (bf16, CFG batch 2,
# benchmarks/bench_mixffn.py --sweep): 3 stages with 64-row strips took the 1600M block at 4096 px from
# 0.98 to 0.64 ms (1.1 -> 1.7 TB/s), the 600M one from 0.55 to 0.35 ms, and 1024 px from 0.108 to 0.088 ms.
_STAGES = 3
# Neighbour columns by `tl.gather` (one SiLU per element, tiles overlapping by two columns) instead of
# shifted reloads (three SiLUs): both pass the tests; the shifted reloads measured faster (H200, H100).
_GATHER = False

try:  # triton is optional: without it this module imports, and only `fused_dwconv_glu` refuses
    import triton

    from . import _mixffn_kernels as _src
except ImportError:
    triton = None
    _KERNEL = None
    _INTERPRETING = False
else:
    # Module-level JIT object (not built in a cached function) so torch.compile traces the launch.
    _KERNEL = triton.jit(_src.dwconv_glu_kernel)
    from triton.runtime.interpreter import InterpretedFunction

    # A constant, so torch.compile traces no isinstance() of a Triton object at each call.
    _INTERPRETING = isinstance(_KERNEL, InterpretedFunction)


def triton_available() -> bool:
    """True when triton is installed (the kernel then runs on CUDA tensors)."""
    return _KERNEL is not None


def _interpreting() -> bool:
    """Whether the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETING


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, height: int, width: int) -> None:
    if x.dim() != 3:
        raise InputError(f"fused_dwconv_glu wants tokens of shape (B, N, 2h); got {tuple(x.shape)}")
    B, N, C = x.shape
    if height <= 0 or width <= 0 or height * width != N:
        raise InputError(f"fused_dwconv_glu: a {height}x{width} grid does not hold the {N} tokens of {tuple(x.shape)}")
    if C % 2 or C == 0:
        raise InputError(f"fused_dwconv_glu needs an even, non-zero channel count (x and gate halves); got {C}")
    if tuple(weight.shape) != (C, 1, 3, 3):
        raise InputError(f"fused_dwconv_glu wants a depthwise weight of shape ({C}, 1, 3, 3); got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise InputError(f"fused_dwconv_glu wants a bias of shape ({C},) or None; got {tuple(bias.shape)}")
    if x.dtype not in _DTYPES:
        raise InputError(f"fused_dwconv_glu supports float32, float16, bfloat16 tokens; got {x.dtype}")
    devices = {x.device, weight.device} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise InputError(f"fused_dwconv_glu: tokens, weight and bias are on different devices: {sorted(map(str, devices))}")
    if _KERNEL is None:
        raise InputError("fused_dwconv_glu needs triton (pip install triton); the Mix-FFN's torch path does not")
    if not x.is_cuda and not _interpreting():
        raise InputError(f"fused_dwconv_glu runs on CUDA tensors (got {x.device}); on CPU it runs only in Triton's "
                         "interpreter (TRITON_INTERPRET=1 set before triton is imported)")


def fused_dwconv_glu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, height: int, width: int,
    *, rows_per_program: int | None = None, gather: bool | None = None, stages: int | None = None,
) -> torch.Tensor:
    """Tokens a (B, N=H*W, 2h) -> c[..., :h] * silu(c[..., h:]) (B, N, h), c = dwconv3x3(silu(a)) + bias.

    `rows_per_program` (default `_ROWS`, or `_ROWS_TALL` for grids of `_TALL` rows or more), `gather`
    (default `_GATHER`) and `stages` (default `_STAGES`) pick the kernel variant, for tests and tuning.
    """
    if rows_per_program is None:
        rows_per_program = _ROWS_TALL if height >= _TALL else _ROWS
    if rows_per_program < 1:
        raise InputError(f"fused_dwconv_glu: rows_per_program must be >= 1; got {rows_per_program}")
    stages = _STAGES if stages is None else stages
    if stages < 1:
        raise InputError(f"fused_dwconv_glu: stages must be >= 1; got {stages}")
    _check(x, weight, bias, height, width)
    B, N, C = x.shape
    hid = C // 2
    out = torch.empty(B, N, hid, device=x.device, dtype=x.dtype)  # (B, N, h)
    if B == 0:
        return out
    w = weight.reshape(C, 9).contiguous()  # (2h, 9): no copy for a contiguous conv weight
    b = bias.contiguous() if bias is not None else w  # an unused pointer when there is no bias
    n_strips = -(-height // rows_per_program)
    gather = _GATHER if gather is None else gather
    if (width + _BLOCK_W) * max(x.stride(1), out.stride(1)) + C * max(x.stride(2), 1) >= 2**31:
        raise InputError(f"fused_dwconv_glu: a grid row of {width} tokens x {C} channels passes the kernel's "
                         "int32 in-row offsets; use the torch path (SANAFLOW_FUSED_MIXFFN=0)")
    # tanh.approx SiLU for half-precision tokens on the GPU (its ~5e-4 relative error is below their
    # rounding); float32 tokens and the interpreter (no inline PTX) keep the exact formula.
    fast = x.dtype != torch.float32 and not _interpreting()
    cols_per_program = _BLOCK_W - 2 if gather else _BLOCK_W
    grid = (-(-width // cols_per_program), -(-hid // _BLOCK_C), B * n_strips)
    _KERNEL[grid](
        x, w, b, out, height, width, hid, rows_per_program, n_strips, *x.stride(), *out.stride(),
        HAS_BIAS=bias is not None, BLOCK_W=_BLOCK_W, BLOCK_C=_BLOCK_C, GATHER=gather, FAST=fast,
        STAGES=stages, num_warps=_NUM_WARPS,
    )
    return out
