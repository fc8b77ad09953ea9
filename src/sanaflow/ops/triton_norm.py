"""Row-wise Triton passes around SANA's GEMMs: fused (residual +) LayerNorm + modulation, and fp8 row quantisation.

`norm_modulate(x, shift, scale, eps, residual, residual_gate)` computes, for tokens x (B, N, D) and
per-sample modulation shift / scale (B, 1, D):

    x' = x + residual            (when given; stored, it is the block's residual stream;
                                  x + residual_gate * residual with a (B, 1, D) gate)
    h  = LayerNorm(x') * (1 + scale) + shift

in one pass (LayerNorm without affine parameters, as SANA's blocks use it). The torch path runs the
norm, then the modulation, and (for the block's second norm) the residual add before them: three
kernels, each reading and writing a (B, N, D) tensor; compiled, inductor fuses them into a looped
reduction that measured ~3x slower than the bytes it moves (`benchmarks/profile_step.py`). The gated
residual is a previous block's last step, x + gate_mlp * ff_out, left to the next block's first norm
(`SanaTransformer.forward` in inference): one pass less over the residual stream.

`quantize_rows(x, dtype, qmax, scale_min)` is the dynamic per-row quantisation of fp8 activations:
one read of the bf16 row, one write of the 1-byte values and the row's float32 scale.

Where an fp8 layer is the only reader of an activation, the pass that produces it can write the
quantized rows itself, and the bf16 tensor is never written nor read back:

- `norm_modulate_quantize(...)`: `norm_modulate` whose h comes out as per-row fp8 values and scales
  (the values `quantize_rows` gives for the h `norm_modulate` returns: h is rounded to the tokens'
  dtype before it is quantized);
- `gated_residual_quantize(x, gate, y, ...)`: the block's gated residual x' = x + gate * y (stored)
  and x' quantized per row, for the cross-attention's query projection.

All keep the whole row in registers (one program per row, D up to 16,384). CPU tensors run the
same kernels in Triton's interpreter (tests; ``TRITON_INTERPRET=1`` before triton is imported).
"""

from __future__ import annotations

import torch

from ..errors import InputError

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# what the quantizing passes write: float8, or float32 scaled values unrounded (tests: Triton's CPU
# interpreter does not round to float8 as the GPU does, so CPU tests check the arithmetic, GPU tests the cast)
_QUANT_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float32)
MAX_ROW = 16384  # widest row a program holds in registers

try:  # triton is optional: without it this module imports, and only the functions below refuse
    import triton

    from . import _norm_kernels as _src
except ImportError:
    triton = None
    _NORM = _QUANT = _RESIDUAL = None
    _INTERPRETING = False
else:
    # Module-level JIT objects (not built in a cached function) so torch.compile traces the launches.
    _NORM = triton.jit(_src.norm_modulate_kernel)
    _QUANT = triton.jit(_src.quantize_rows_kernel)
    _RESIDUAL = triton.jit(_src.gated_residual_quantize_kernel)
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


def _rows_view(t: torch.Tensor, name: str, shape: tuple[int, ...], what: str = "norm_modulate") -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise InputError(f"{what}: {name} must have shape {shape}; got {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def _squeeze_mid(t: torch.Tensor) -> torch.Tensor:
    """(B, 1, D) -> (B, D) view; other shapes unchanged (checked by the caller)."""
    return t[:, 0] if t.dim() == 3 and t.shape[1] == 1 else t


def _check_tokens(x: torch.Tensor, what: str) -> tuple[int, int, int]:
    """(B, N, D) of tokens a row kernel accepts."""
    if x.dim() != 3:
        raise InputError(f"{what} wants tokens of shape (B, N, D); got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise InputError(f"{what} supports float32, float16, bfloat16 tokens; got {x.dtype}")
    if x.shape[2] > MAX_ROW:
        raise InputError(f"{what} holds a row of at most {MAX_ROW} channels; got {x.shape[2]}")
    return tuple(x.shape)


def _check_same_device(what: str, *tensors: torch.Tensor | None) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise InputError(f"{what}: inputs on different devices: {sorted(map(str, devices))}")


def _check_quant_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in _QUANT_DTYPES:
        raise InputError(f"{what} writes float8_e4m3fn, float8_e5m2 (or float32, unrounded); got {dtype}")


def _norm_inputs(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor | None,
    residual_gate: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The checked (B, N, D) tokens and (B, D) modulation (and gate) views `norm_modulate_kernel` reads."""
    B, N, D = _check_tokens(x, "norm_modulate")
    x = _rows_view(x, "x", (B, N, D))
    shift = _rows_view(_squeeze_mid(shift), "shift", (B, D))
    scale = _rows_view(_squeeze_mid(scale), "scale", (B, D))
    if residual is not None:
        residual = _rows_view(residual, "residual", (B, N, D))
        if residual.dtype != x.dtype:
            raise InputError(f"norm_modulate: residual dtype {residual.dtype} differs from the tokens' {x.dtype}")
    if residual_gate is not None:
        if residual is None:
            raise InputError("norm_modulate: a residual_gate needs a residual")
        residual_gate = _rows_view(_squeeze_mid(residual_gate), "residual_gate", (B, D))
        if residual_gate.dtype != x.dtype:
            raise InputError(f"norm_modulate: residual_gate dtype {residual_gate.dtype} differs from the tokens' "
                             f"{x.dtype}")
    _check_same_device("norm_modulate", x, shift, scale, residual, residual_gate)
    _check_device(x, "norm_modulate")
    return x, shift, scale, residual, residual_gate


def _launch_norm(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, residual: torch.Tensor | None,
    residual_gate: torch.Tensor | None, h: torch.Tensor, h_scale: torch.Tensor | None, qmax: float,
    scale_min: float,
) -> torch.Tensor:
    """Run `norm_modulate_kernel` into h (B, N, D) (quantized into h, h_scale when h_scale is given); returns x'."""
    B, N, D = x.shape
    x_new = torch.empty_like(x) if residual is not None else x
    if B * N == 0:
        return x_new
    r = residual if residual is not None else x  # an unused pointer without a residual
    g = residual_gate if residual_gate is not None else shift  # and without a gate
    block, warps = _block(D)
    _NORM[(B * N,)](
        x, r, g, x_new, shift, scale, h, h_scale if h_scale is not None else h, N, D, float(eps),
        x.stride(0), x.stride(1), r.stride(0), r.stride(1), g.stride(0), x_new.stride(0), x_new.stride(1),
        shift.stride(0), scale.stride(0), h.stride(0), h.stride(1),
        HAS_RES=residual is not None, GATED=residual_gate is not None, QUANT=h_scale is not None,
        QMAX=float(qmax), SCALE_MIN=float(scale_min), BLOCK=block, num_warps=warps,
    )
    return x_new


def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    residual_gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', h): x' = x + residual (x itself without one), h = LayerNorm(x') * (1 + scale) + shift, in x's dtype.

    x, residual: (B, N, D); shift, scale: (B, 1, D) or (B, D). With `residual_gate` (B, 1, D) or
    (B, D), x' = x + residual_gate * residual (``torch.addcmul``: one rounding). Forward only.
    """
    x, shift, scale, residual, residual_gate = _norm_inputs(x, shift, scale, residual, residual_gate)
    h = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    return _launch_norm(x, shift, scale, eps, residual, residual_gate, h, None, 1.0, 1.0), h


def norm_modulate_quantize(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, residual: torch.Tensor | None,
    dtype: torch.dtype, qmax: float, scale_min: float, residual_gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x', q (B*N, D), s float32 (B*N, 1)): `norm_modulate`'s x', and its h quantized per row in one pass.

    q, s are what `quantize_rows(h.reshape(-1, D), dtype, qmax, scale_min)` returns for the h of
    `norm_modulate` (h rounded to x's dtype, then quantized), without h ever being written.
    """
    _check_quant_dtype(dtype, "norm_modulate_quantize")
    x, shift, scale, residual, residual_gate = _norm_inputs(x, shift, scale, residual, residual_gate)
    B, N, D = x.shape
    q = torch.empty(B, N, D, device=x.device, dtype=dtype)
    s = torch.empty(B * N, 1, device=x.device, dtype=torch.float32)
    x_new = _launch_norm(x, shift, scale, eps, residual, residual_gate, q, s, qmax, scale_min)
    return x_new, q.view(B * N, D), s


def gated_residual_quantize(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, qmax: float, scale_min: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x', q (B*N, D), s float32 (B*N, 1)): x' = x + gate * y in x's dtype, and x' quantized per row, in one pass.

    x, y: (B, N, D) of one dtype; gate: (B, 1, D) or (B, D) in it too (the block's
    ``torch.addcmul(x, gate, y)``). q, s are what `quantize_rows(x'.reshape(-1, D), ...)` returns.
    Forward only.
    """
    what = "gated_residual_quantize"
    _check_quant_dtype(dtype, what)
    B, N, D = _check_tokens(x, what)
    x = _rows_view(x, "x", (B, N, D), what)
    y = _rows_view(y, "y", (B, N, D), what)
    gate = _rows_view(_squeeze_mid(gate), "gate", (B, D), what)
    if y.dtype != x.dtype or gate.dtype != x.dtype:
        raise InputError(f"{what}: x, gate, y must share a dtype; got {x.dtype}, {gate.dtype}, {y.dtype}")
    _check_same_device(what, x, gate, y)
    _check_device(x, what)
    x_new = torch.empty_like(x)
    q = torch.empty(B * N, D, device=x.device, dtype=dtype)
    s = torch.empty(B * N, 1, device=x.device, dtype=torch.float32)
    if B * N == 0 or D == 0:
        return x_new, q, s.fill_(scale_min / qmax)
    block, warps = _block(D)
    _RESIDUAL[(B * N,)](
        x, gate, y, x_new, q, s, N, D,
        x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1), x_new.stride(0), x_new.stride(1),
        QMAX=float(qmax), SCALE_MIN=float(scale_min), BLOCK=block, num_warps=warps,
    )
    return x_new, q, s


def quantize_rows(x: torch.Tensor, dtype: torch.dtype, qmax: float, scale_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantisation of x (M, K) to a float8 `dtype`: (q (M, K), scale float32 (M, 1)), x ~ q * scale.

    scale = max(amax |x|, scale_min) / qmax; q = clamp(x / scale, -qmax, qmax), rounded to nearest.
    `dtype` float32 writes the scaled values unrounded (see `_QUANT_DTYPES`).
    """
    _check_quant_dtype(dtype, "quantize_rows")
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
