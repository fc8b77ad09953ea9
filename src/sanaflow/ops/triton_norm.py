"""Row-wise Triton passes around SANA's GEMMs: fused (residual +) LayerNorm + modulation, and fp8 row quantisation.

`norm_modulate(x, shift, scale, eps, residual)` computes, for tokens x (B, N, D) and per-sample
modulation shift / scale (B, 1, D):

    x' = x + residual            (when given; stored, it is the block's residual stream)
    h  = LayerNorm(x') * (1 + scale) + shift

in one pass (LayerNorm without affine parameters, as SANA's blocks use it). The torch path runs the
norm, then the modulation, and (for the block's second norm) the residual add before them: three
kernels, each reading and writing a (B, N, D) tensor; compiled, inductor fuses them into a looped
reduction that measured ~3x slower than the bytes it moves (`benchmarks/profile_step.py`).

`quantize_rows(x, dtype, qmax, scale_min)` is the dynamic per-row quantisation of fp8 activations:
one read of the bf16 row, one write of the 1-byte values and the row's float32 scale.

Both keep the whole row in registers (one program per row, D up to 16,384). CPU tensors run the
same kernels in Triton's interpreter (tests; ``TRITON_INTERPRET=1`` before triton is imported).
"""

from __future__ import annotations

import torch

from ..errors import InputError

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROW = 16384  # widest row a program holds in registers

try:  # triton is optional: without it this module imports, and only the functions below refuse
    import triton

    from . import _norm_kernels as _src
except ImportError:
    triton = None
    _NORM = _QUANT = None
    _INTERPRETING = False
else:
    # Module-level JIT objects (not built in a cached function) so torch.compile traces the launches.
    _NORM = triton.jit(_src.norm_modulate_kernel)
    _QUANT = triton.jit(_src.quantize_rows_kernel)
    from triton.runtime.interpreter import InterpretedFunction

    _INTERPRETING = isinstance(_NORM, InterpretedFunction)  # a constant: no isinstance() in traced code


def triton_available() -> bool:
    """True when triton is installed (the kernels then run on CUDA tensors)."""
    return _NORM is not None


def _block(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of `width` elements."""
    block = max(16, 1 << (width - 1).bit_length())
    return block, 4 if block <= 2048 else 8 if block <= 8192 else 16


def _check_device(x: torch.Tensor, what: str) -> None:
    if _NORM is None:
        raise InputError(f"{what} needs triton (pip install triton); the torch path does not")
    if not x.is_cuda and not _INTERPRETING:
        raise InputError(f"{what} runs on CUDA tensors (got {x.device}); on CPU only in Triton's interpreter "
                         "(TRITON_INTERPRET=1 set before triton is imported)")


def _rows_view(t: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise InputError(f"norm_modulate: {name} must have shape {shape}; got {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def _squeeze_mid(t: torch.Tensor) -> torch.Tensor:
    """(B, 1, D) -> (B, D) view; other shapes unchanged (checked by the caller)."""
    return t[:, 0] if t.dim() == 3 and t.shape[1] == 1 else t


def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', h): x' = x + residual (x itself without one), h = LayerNorm(x') * (1 + scale) + shift, in x's dtype.

    x, residual: (B, N, D); shift, scale: (B, 1, D) or (B, D). Forward only.
    """
    if x.dim() != 3:
        raise InputError(f"norm_modulate wants tokens of shape (B, N, D); got {tuple(x.shape)}")
    B, N, D = x.shape
    if x.dtype not in _DTYPES:
        raise InputError(f"norm_modulate supports float32, float16, bfloat16 tokens; got {x.dtype}")
    if D > MAX_ROW:
        raise InputError(f"norm_modulate holds a row of at most {MAX_ROW} channels; got {D}")
    x = _rows_view(x, "x", (B, N, D))
    shift = _rows_view(_squeeze_mid(shift), "shift", (B, D))
    scale = _rows_view(_squeeze_mid(scale), "scale", (B, D))
    if residual is not None:
        residual = _rows_view(residual, "residual", (B, N, D))
        if residual.dtype != x.dtype:
            raise InputError(f"norm_modulate: residual dtype {residual.dtype} differs from the tokens' {x.dtype}")
    devices = {t.device for t in (x, shift, scale, residual) if t is not None}
    if len(devices) != 1:
        raise InputError(f"norm_modulate: inputs on different devices: {sorted(map(str, devices))}")
    _check_device(x, "norm_modulate")
    h = torch.empty(B, N, D, device=x.device, dtype=x.dtype)
    x_new = torch.empty_like(h) if residual is not None else x
    if B * N == 0:
        return x_new, h
    r = residual if residual is not None else x  # an unused pointer without a residual
    block, warps = _block(D)
    _NORM[(B * N,)](
        x, r, x_new, shift, scale, h, N, D, float(eps),
        x.stride(0), x.stride(1), r.stride(0), r.stride(1), x_new.stride(0), x_new.stride(1),
        shift.stride(0), scale.stride(0), h.stride(0), h.stride(1),
        HAS_RES=residual is not None, BLOCK=block, num_warps=warps,
    )
    return x_new, h


def quantize_rows(x: torch.Tensor, dtype: torch.dtype, qmax: float, scale_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantisation of x (M, K) to a float8 `dtype`: (q (M, K), scale float32 (M, 1)), x ~ q * scale.

    scale = max(amax |x|, scale_min) / qmax; q = clamp(x / scale, -qmax, qmax), rounded to nearest.
    `dtype` float32 writes the scaled values unrounded (tests: Triton's CPU interpreter does not
    round to float8 as the GPU does, so CPU tests check the arithmetic and the GPU tests the cast).
    """
    if dtype not in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float32):
        raise InputError(f"quantize_rows writes float8_e4m3fn, float8_e5m2 (or float32, unrounded); got {dtype}")
    if x.dim() != 2:
        raise InputError(f"quantize_rows wants a (rows, K) matrix; got {tuple(x.shape)}")
    M, K = x.shape
    if x.dtype not in _DTYPES:
        raise InputError(f"quantize_rows supports float32, float16, bfloat16 input; got {x.dtype}")
    if K > MAX_ROW:
        raise InputError(f"quantize_rows holds a row of at most {MAX_ROW} values; got {K}")
    _check_device(x, "quantize_rows")
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(M, K, device=x.device, dtype=dtype)
    s = torch.empty(M, 1, device=x.device, dtype=torch.float32)
    if M == 0 or K == 0:
        return q, s.fill_(scale_min / qmax)
    block, warps = _block(K)
    _QUANT[(M,)](x, q, s, K, x.stride(0), q.stride(0), QMAX=float(qmax), SCALE_MIN=float(scale_min), BLOCK=block,
                 num_warps=warps)
    return q, s
