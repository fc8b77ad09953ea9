"""Triton kernel of the fused Mix-FFN middle (imported only when triton is installed).

The kernel is a plain function here (its helpers are ``triton.jit`` functions, which Triton needs
for calls from a kernel); `sanaflow.ops.triton_mixffn` compiles it with ``triton.jit`` for CUDA
tensors and wraps it in Triton's interpreter for CPU tensors (``TRITON_INTERPRET=1``), so the same
source is tested on a CPU-only machine.

Notation: ``a`` (B, N, 2h) is the 1x1-conv output on a row-major (H, W) token grid, channels last;
``s = silu(a)``; ``c = dwconv3x3(s) + bias`` (zero padding); ``out = c[:h] * silu(c[h:])`` (B, N, h).
All loads are upcast to float32 at once (the interpreter mishandles bf16 arithmetic).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _silu(v, FAST: tl.constexpr):
    """silu(v) in float32. FAST: 0.5 v (1 + tanh(v / 2)) with the hardware's tanh.approx.f32 (one SFU
    instruction instead of an exp and a reciprocal; relative error ~5e-4, for half-precision outputs)."""
    if FAST:
        half = 0.5 * v
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [half], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return half + half * t
    else:
        return v / (1.0 + tl.exp(-v))


@triton.jit
def _load_row(base, row_ok, offs, m_left, m_mid, m_right, step, GATHER: tl.constexpr, FAST: tl.constexpr):
    """silu(a) of one grid row at columns `cols - 1`, `cols`, `cols + 1`: three (BLOCK_W, BLOCK_C) tiles.

    `base` points at the row's first token (a scalar pointer), `offs` are the tile's int32 element
    offsets from it, `step` the token stride (one column), `m_*` the loop-invariant column masks of the
    three shifts and `row_ok` (BLOCK_W,) whether the row lies in the grid. GATHER: one load and one
    SiLU, the neighbours taken from the tile by `tl.gather` (the tile's first and last column then get
    clamped, wrong neighbours: the caller does not store them). Otherwise three loads (the shifted
    ones hit L1) and three SiLUs. silu(0) = 0: zero padding after the SiLU equals padding before it.
    """
    ok = row_ok[:, None]
    mid = _silu(tl.load(base + offs, mask=m_mid & ok, other=0.0).to(tl.float32), FAST)
    if GATHER:
        i = tl.arange(0, offs.shape[0])[:, None] + tl.zeros(offs.shape, dtype=tl.int32)  # tile columns
        left = tl.gather(mid, tl.maximum(i - 1, 0), axis=0)
        right = tl.gather(mid, tl.minimum(i + 1, offs.shape[0] - 1), axis=0)
    else:
        left = _silu(tl.load(base + (offs - step), mask=m_left & ok, other=0.0).to(tl.float32), FAST)
        right = _silu(tl.load(base + (offs + step), mask=m_right & ok, other=0.0).to(tl.float32), FAST)
    return left, mid, right


@triton.jit
def _taps(w_ptr, offs_c, mask_c, i: tl.constexpr):
    """Row `i` of the 3x3 depthwise weights (C, 1, 3, 3) contiguous: three (1, BLOCK_C) float32 rows."""
    w0 = tl.load(w_ptr + offs_c * 9 + 3 * i + 0, mask=mask_c, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + offs_c * 9 + 3 * i + 1, mask=mask_c, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + offs_c * 9 + 3 * i + 2, mask=mask_c, other=0.0).to(tl.float32)
    return w0[None, :], w1[None, :], w2[None, :]


def dwconv_glu_kernel(
    x_ptr, w_ptr, b_ptr, o_ptr,
    H, W, HID, rows_per_prog, n_strips,
    s_xb, s_xn, s_xc,
    s_ob, s_on, s_oc,
    HAS_BIAS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, GATHER: tl.constexpr,
    FAST: tl.constexpr, STAGES: tl.constexpr,
):
    """out = dw(silu(a))[:h] * silu(dw(silu(a))[h:]) for a strip of rows x BLOCK_W columns x BLOCK_C
    channels; grid (cdiv(W, BLOCK_W), cdiv(h, BLOCK_C), B * n_strips), or with GATHER (neighbour
    columns shuffled in registers, see `_load_row`) tiles of BLOCK_W columns that overlap by two and
    store their BLOCK_W - 2 inner ones: grid (cdiv(W, BLOCK_W - 2), ...).

    The rows are swept top to bottom: each input row is loaded (and SiLU'd) once per column shift,
    and its three weighted horizontal sums go to output rows r+1, r, r-1; two running accumulators
    carry the unfinished rows, so output row r-1 is complete (and stored) after input row r.
    Everything per element that does not depend on the row (the tile's offsets within a row and the
    column masks) is computed once before the sweep: the loop does loads, SiLUs and FMAs, and only
    a scalar pointer moves (the caller guarantees the in-row offsets fit int32). STAGES > 1 asks
    Triton to software-pipeline the sweep (`tl.range(num_stages=...)`: the next rows' loads are in
    flight while the current row is summed); 1 runs it as a plain loop.
    """
    pid_w = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bs = tl.program_id(2)
    b = (pid_bs // n_strips).to(tl.int64)
    y0 = (pid_bs % n_strips) * rows_per_prog
    y1 = tl.minimum(y0 + rows_per_prog, H)
    if GATHER:
        cols = pid_w * (BLOCK_W - 2) - 1 + tl.arange(0, BLOCK_W)
        inner = (tl.arange(0, BLOCK_W) >= 1) & (tl.arange(0, BLOCK_W) < BLOCK_W - 1) & (cols >= 0)
    else:
        cols = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
        inner = cols >= 0  # all of them
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = offs_c < HID  # (BLOCK_C,)
    mask_c = in_c[None, :]
    # loop invariants: in-row element offsets of the tile (int32) and the masks of the three column shifts
    x_offs = cols[:, None] * s_xn + offs_c[None, :] * s_xc  # (BLOCK_W, BLOCK_C)
    o_offs = cols[:, None] * s_on + offs_c[None, :] * s_oc
    m_mid = ((cols >= 0) & (cols < W))[:, None] & mask_c
    m_left = ((cols >= 1) & (cols <= W))[:, None] & mask_c
    m_right = ((cols >= -1) & (cols < W - 1))[:, None] & mask_c
    store_cols = inner & (cols < W)
    x_base = x_ptr + b * s_xb
    o_base = o_ptr + b * s_ob
    gate = HID * s_xc  # the gate half: channels h..2h-1
    # int64: B*N*2h passes 2**31 at 4096 px. tl.cast (not W.to) also takes a W specialised to a
    # constant, as inductor's analysis of user kernels does (it otherwise assumes every input mutated).
    row_stride = tl.cast(W, tl.int64) * s_xn
    out_row_stride = tl.cast(W, tl.int64) * s_on

    # weights of the x half (channels c) and of the gate half (channels h + c)
    xa0, xa1, xa2 = _taps(w_ptr, offs_c, in_c, 0)
    xb0, xb1, xb2 = _taps(w_ptr, offs_c, in_c, 1)
    xc0, xc1, xc2 = _taps(w_ptr, offs_c, in_c, 2)
    ga0, ga1, ga2 = _taps(w_ptr + HID * 9, offs_c, in_c, 0)
    gb0, gb1, gb2 = _taps(w_ptr + HID * 9, offs_c, in_c, 1)
    gc0, gc1, gc2 = _taps(w_ptr + HID * 9, offs_c, in_c, 2)
    if HAS_BIAS:
        bias_x = tl.load(b_ptr + offs_c, mask=in_c, other=0.0).to(tl.float32)[None, :]
        bias_g = tl.load(b_ptr + HID + offs_c, mask=in_c, other=0.0).to(tl.float32)[None, :]
    else:
        bias_x = tl.zeros((1, BLOCK_C), dtype=tl.float32)
        bias_g = tl.zeros((1, BLOCK_C), dtype=tl.float32)

    acc_x = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)  # output row r (rows r-1 and r summed in)
    acc_g = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    nxt_x = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)  # output row r+1 (row r summed in)
    nxt_g = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for r in tl.range(y0 - 1, y1 + 1, num_stages=STAGES):
        rv = cols * 0 + r  # as a vector: the interpreter cannot combine a scalar bool with a mask
        row_ok = (rv >= 0) & (rv < H)
        base = x_base + r * row_stride  # a scalar pointer; never dereferenced for rows outside the grid
        lx, cx, rx = _load_row(base, row_ok, x_offs, m_left, m_mid, m_right, s_xn, GATHER, FAST)
        lg, cg, rg = _load_row(base + gate, row_ok, x_offs, m_left, m_mid, m_right, s_xn, GATHER, FAST)
        # finish output row r-1 with weight row 2 (the input row below it), then store it
        done_x = acc_x + xc0 * lx + xc1 * cx + xc2 * rx + bias_x  # (BLOCK_W, BLOCK_C)
        done_g = acc_g + gc0 * lg + gc1 * cg + gc2 * rg + bias_g
        out = done_x * _silu(done_g, FAST)
        y = r - 1
        yv = cols * 0 + y
        keep = store_cols & (yv >= y0) & (yv < y1)  # the first two sweeps only fill the accumulators
        tl.store(o_base + y * out_row_stride + o_offs, out.to(o_ptr.dtype.element_ty), mask=keep[:, None] & mask_c)
        acc_x = nxt_x + xb0 * lx + xb1 * cx + xb2 * rx  # output row r: weight row 1
        acc_g = nxt_g + gb0 * lg + gb1 * cg + gb2 * rg
        nxt_x = xa0 * lx + xa1 * cx + xa2 * rx  # output row r+1: weight row 0 (the row above it)
        nxt_g = ga0 * lg + ga1 * cg + ga2 * rg
