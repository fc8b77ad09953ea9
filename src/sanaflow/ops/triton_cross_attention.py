"""Caption cross-attention in Triton (inference): softmax attention of image tokens to a short caption.

Same contract as `sanaflow.ops.cross_attention.attend_tokens`: q (B, h, N, d) (any strides, e.g. a
view of the (B, N, h*d) projection), k/v (B, h, L, d), an additive bias None or broadcastable to
(B, 1, 1, L) -> (B, N, h*d) in q's dtype, float32 softmax and accumulation inside.

Why a kernel of our own: SANA's caption has L = 300 tokens and its heads are 72 (600M) or 112
(1600M) wide, a shape where SDPA's fused kernels pad the head dim to 128 and sweep every padded
caption token. This kernel covers the head dim with two power-of-2 slices (72 = 64 + 16 wide),
and skips the key blocks that the mask removes (a CFG pair's negative prompt is mostly padding),
which is exact in float32 (see `_cross_attention_kernels`). Block sizes are tuned per shape on the
first call (`triton.autotune` over `_CONFIGS`).

CPU tensors run the same kernel in Triton's interpreter (slow, tests only; ``TRITON_INTERPRET=1``
set before triton is first imported).
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
# (BLOCK_M, BLOCK_L, num_warps, num_stages) tried by the autotuner on the first call of a shape.
# The winners of benchmarks/bench_cross_attention.py on an H100 (2026-12-06) over SANA's shapes.
_CONFIGS = ((128, 64, 4, 3), (128, 32, 4, 2), (64, 64, 4, 2), (128, 128, 8, 2))
_INTERPRETER_META = {"BLOCK_M": 16, "BLOCK_L": 16}  # the interpreter: small tiles, several blocks per test

try:  # triton is optional: without it this module imports, and only the functions below refuse
    import triton

    from . import _cross_attention_kernels as _src
except ImportError:
    triton = None
    _KERNEL = _TUNED = None
    _INTERPRETING = False
else:
    from triton.runtime.interpreter import InterpretedFunction

    # Module-level JIT objects (not built in a cached function) so torch.compile traces the launches.
    _KERNEL = triton.jit(_src.cross_attention_kernel)
    _INTERPRETING = isinstance(_KERNEL, InterpretedFunction)
    _TUNED = None if _INTERPRETING else triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_L": n}, num_warps=w, num_stages=s) for m, n, w, s in _CONFIGS],
        key=["N", "L", "D", "H"],
    )(_KERNEL)


def triton_available() -> bool:
    """True when triton is installed (the kernel then runs on CUDA tensors)."""
    return _KERNEL is not None


def head_slices(d: int) -> tuple[int, int]:
    """(D0, D1): two power-of-2 widths (D1 may be 0) with D0 + D1 >= d, each >= 16 (tl.dot's minimum)."""
    d0 = max(16, 1 << (d.bit_length() - 1))
    rest = d - d0
    d1 = 0 if rest <= 0 else max(16, 1 << (rest - 1).bit_length())
    return d0, d1


def _bias_ok(bias: torch.Tensor, B: int, L: int) -> bool:
    """Whether an additive bias is a key-padding bias: broadcastable to (B, 1, 1, L)."""
    try:
        return bias.dim() <= 4 and torch.broadcast_shapes(bias.shape, (B, 1, 1, L)) == (B, 1, 1, L)
    except RuntimeError:
        return False


def _bias_rows(bias: torch.Tensor | None, B: int, L: int) -> torch.Tensor | None:
    """The additive bias as a (B, L) view (stride 0 where it broadcasts), or an InputError."""
    if bias is None:
        return None
    if not _bias_ok(bias, B, L):
        raise InputError(f"triton cross-attention takes a key-padding bias broadcastable to (B={B}, 1, 1, L={L}); "
                         f"got {tuple(bias.shape)}")
    return torch.broadcast_to(bias, (B, 1, 1, L))[:, 0, 0, :]


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `cross_attention_triton` takes these tensors (else the caller runs SDPA)."""
    if _KERNEL is None or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    B, H, _, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != d or d > MAX_HEAD_DIM or k.shape[2] == 0:
        return False
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    return bias is None or _bias_ok(bias, B, k.shape[2])


def cross_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None, *, meta: dict | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v: q (B,h,N,d), k/v (B,h,L,d), bias ~ (B,1,1,L) -> (B, N, h*d).

    `meta` ({"BLOCK_M", "BLOCK_L", "num_warps", "num_stages"}) fixes the kernel's blocks instead
    of the autotuner's choice (tests and tuning).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError(f"cross-attention wants q (B, heads, N, d) and k, v (B, heads, L, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, d = q.shape
    L = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != d:
        raise InputError(f"cross-attention: k and v must be (B={B}, heads={H}, L, d={d}) like q; got k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}")
    if L == 0:
        raise InputError("cross-attention needs at least one caption token; got L = 0")
    if d > MAX_HEAD_DIM:
        raise InputError(f"triton cross-attention supports head dims <= {MAX_HEAD_DIM}; got {d}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"triton cross-attention needs q, k, v of one dtype among float32, float16, bfloat16; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if _KERNEL is None:
        raise InputError("triton cross-attention needs triton (pip install triton); use "
                         "sanaflow.ops.cross_attention.attend_tokens instead")
    if not q.is_cuda and not _INTERPRETING:
        raise InputError(f"triton cross-attention runs on CUDA tensors (got {q.device}); on CPU only in Triton's "
                         "interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    rows = _bias_rows(bias, B, L)
    out = torch.empty(B, N, H, d, device=q.device, dtype=q.dtype)  # token-major: heads flatten for free
    if B * H * N == 0:
        return out.flatten(2)
    d0, d1 = head_slices(d)
    brow = rows if rows is not None else q  # an unused pointer without a bias
    s_bias = rows.stride() if rows is not None else (0, 0)
    args = (q, k, v, brow, out, H, N, L, d, math.log2(math.e) / math.sqrt(d),
            *q.stride(), *k.stride(), *v.stride(), *s_bias, *out.stride())
    consts = dict(HAS_BIAS=rows is not None, D0=d0, D1=d1, UPCAST=_INTERPRETING,
                  PRECISION="ieee" if q.dtype == torch.float32 or _INTERPRETING else "tf32")
    if _INTERPRETING or meta is not None:
        m = dict(_INTERPRETER_META if meta is None else meta)
        grid = (triton.cdiv(N, m["BLOCK_M"]), B * H)
        _KERNEL[grid](*args, **consts, **m)
    else:
        _TUNED[lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H)](*args, **consts)
    return out.flatten(2)


def tuned_config(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """The autotuner's choice for this shape, once a call has tuned it (benchmarks report it)."""
    if _TUNED is None:
        return None
    B, H, N, d = q.shape
    for key, cfg in _TUNED.cache.items():
        if tuple(key[:4]) == (N, k.shape[2], d, H):
            return str(cfg)
    return None
