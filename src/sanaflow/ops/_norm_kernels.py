"""Triton kernels of the row-wise passes around SANA's GEMMs (imported only when triton is installed).

Plain functions here; `sanaflow.ops.triton_norm` compiles them with ``triton.jit`` for CUDA tensors
and wraps them in Triton's interpreter for CPU tensors (``TRITON_INTERPRET=1``), so the same source
is tested on a CPU-only machine. One program per token row; the whole row (padded to BLOCK, a power
of two) lives in registers, so every input element is read once and every output written once.
All arithmetic is float32.
"""

from __future__ import annotations

import triton.language as tl


def norm_modulate_kernel(
    x_ptr, r_ptr, g_ptr, xo_ptr, shift_ptr, scale_ptr, h_ptr, hs_ptr,
    N, D, eps,
    s_xb, s_xn, s_rb, s_rn, s_gb, s_ob, s_on, s_mb, s_cb, s_hb, s_hn,
    HAS_RES: tl.constexpr, GATED: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
    SCALE_MIN: tl.constexpr, BLOCK: tl.constexpr,
):
    """x' = x (+ r, or + g[b] * r when GATED, rounded to x's dtype and stored when HAS_RES); h = LayerNorm(x') * (1 + scale[b]) + shift[b].

    x, r, x', h: (B, N, D) with unit channel stride; g, shift, scale: (B, [1,] D) with unit channel
    stride. LayerNorm without affine parameters, biased variance, as torch's.
    QUANT: h is written quantized per row instead (h_ptr: the values, hs_ptr: one float32 scale per
    row), with the arithmetic of `quantize_rows_kernel` applied to h rounded to x's dtype: the bf16 h
    that the unquantized variant stores and the row quantisation would read back, so the two paths
    give the same bits.
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row % N
    offs = tl.arange(0, BLOCK)
    m = offs < D
    x = tl.load(x_ptr + b * s_xb + n * s_xn + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + b * s_rb + n * s_rn + offs, mask=m, other=0.0).to(tl.float32)
        # the new residual stream is stored in its dtype; the norm reads the stored (rounded) values
        if GATED:
            g = tl.load(g_ptr + b * s_gb + offs, mask=m, other=0.0).to(tl.float32)
            x = tl.fma(g, r, x).to(xo_ptr.dtype.element_ty)  # torch's addcmul: float32, one rounding
        else:
            x = (x + r).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + b * s_ob + n * s_on + offs, x, mask=m)
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(m, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / D
    # (inductor passes a float argument as float64: cast, or the row's arithmetic would run in float64)
    rstd = 1.0 / tl.sqrt(var + tl.cast(eps, tl.float32))
    shift = tl.load(shift_ptr + b * s_mb + offs, mask=m, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * s_cb + offs, mask=m, other=0.0).to(tl.float32)
    h = xc * rstd * (1.0 + scale) + shift
    if QUANT:
        h = h.to(x_ptr.dtype.element_ty).to(tl.float32)  # the stored h of the unquantized variant
        amax = tl.max(tl.abs(h), axis=0)  # masked lanes hold 0
        row_scale = tl.maximum(amax, SCALE_MIN) / QMAX
        h = tl.minimum(tl.maximum(h / row_scale, -QMAX), QMAX)
        tl.store(hs_ptr + row, row_scale)
    tl.store(h_ptr + b * s_hb + n * s_hn + offs, h.to(h_ptr.dtype.element_ty), mask=m)


def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, s_xm, s_qm,
                         QMAX: tl.constexpr, SCALE_MIN: tl.constexpr, BLOCK: tl.constexpr):
    """Per-row symmetric quantisation: scale = max(amax|x|, scale_min) / qmax; q = clamp(x / scale) in q's dtype."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < K
    x = tl.load(x_ptr + row * s_xm + offs, mask=m, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(amax, SCALE_MIN) / QMAX  # constexpr floats: float32 arithmetic
    q = tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)
    tl.store(q_ptr + row * s_qm + offs, q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + row, scale)


def gated_residual_quantize_kernel(
    x_ptr, g_ptr, y_ptr, xo_ptr, q_ptr, s_ptr,
    N, D,
    s_xb, s_xn, s_gb, s_yb, s_yn, s_ob, s_on,
    QMAX: tl.constexpr, SCALE_MIN: tl.constexpr, BLOCK: tl.constexpr,
):
    """x' = x + gate[b] * y, rounded to x's dtype and stored; x' quantized per row as `quantize_rows_kernel` does.

    x, y, x': (B, N, D) with unit channel stride; gate: (B, [1,] D) with unit channel stride;
    q: (B * N, D) contiguous; s: (B * N,) float32.
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row % N
    offs = tl.arange(0, BLOCK)
    m = offs < D
    x = tl.load(x_ptr + b * s_xb + n * s_xn + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * s_gb + offs, mask=m, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * s_yb + n * s_yn + offs, mask=m, other=0.0).to(tl.float32)
    # torch's addcmul: float32 arithmetic, one rounding to the tokens' dtype; the stored value is quantized
    x = tl.fma(g, y, x).to(xo_ptr.dtype.element_ty)
    tl.store(xo_ptr + b * s_ob + n * s_on + offs, x, mask=m)
    x = x.to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(amax, SCALE_MIN) / QMAX
    q = tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)
    tl.store(q_ptr + row * D + offs, q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + row, scale)
