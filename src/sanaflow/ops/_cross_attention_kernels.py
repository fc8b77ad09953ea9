"""Triton kernel of the caption cross-attention (imported only when triton is installed).

A plain function here; `sanaflow.ops.triton_cross_attention` compiles it with ``triton.jit`` for
CUDA tensors and wraps it in Triton's interpreter for CPU tensors, so the same source is tested on
a CPU-only machine.

One program per (block of BLOCK_M queries, batch * head): the caption's keys and values are swept
in blocks of BLOCK_L with the online softmax (running row maximum and sum, base 2), the output is
written token-major, (B, N, heads, d), so that flattening the heads is free.

The head dim is covered by two power-of-2 slices, D0 (the largest power of 2 <= d, at least 16) and
D1 (the rest rounded up, 0 when d is a power of 2): SANA's cross-attention heads are 72 wide
(600M), which one slice would pad to 128; two slices take 64 + 16.

A key block whose every bias is at most SKIP_BIAS is skipped when the batch row has any key above
it: a padded caption token (bias -1e4 in the model) then weighs exp(-1e4 + ...) against a real
token, which is exactly 0 in float32 for any score gap under ~4,900. A row whose keys are all
masked keeps every block (its softmax is the plain one, as the reference computes it).
"""

from __future__ import annotations

import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # globals a jit function reads must be constexpr
SKIP_BIAS = tl.constexpr(-5000.0)


def cross_attention_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr,
    H, N, L, D, qk_scale,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vh, s_vl, s_vd,
    s_bb, s_bl,
    s_ob, s_on, s_oh, s_od,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """softmax(q k^T * scale + bias) v for one block of queries; grid (cdiv(N, BLOCK_M), B * H)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 base offsets: B*N*h*d may pass 2**31
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    d0 = tl.arange(0, D0)
    q_base = q_ptr + b * s_qb + h * s_qh
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    q0 = tl.load(q_base + offs_m[:, None] * s_qn + d0[None, :] * s_qd,
                 mask=mask_m[:, None] & (d0 < D)[None, :], other=0.0)
    if UPCAST:  # the interpreter: float32 arithmetic throughout
        q0 = q0.to(tl.float32)
    acc0 = tl.zeros((BLOCK_M, D0), dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        q1 = tl.load(q_base + offs_m[:, None] * s_qn + d1[None, :] * s_qd,
                     mask=mask_m[:, None] & (d1 < D)[None, :], other=0.0)
        if UPCAST:
            q1 = q1.to(tl.float32)
        acc1 = tl.zeros((BLOCK_M, D1), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)

    if HAS_BIAS:
        b_base = bias_ptr + b * s_bb
        seen = tl.zeros((BLOCK_L,), dtype=tl.int32)
        for l0 in range(0, L, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            bias = tl.load(b_base + offs_l * s_bl, mask=offs_l < L, other=float("-inf")).to(tl.float32)
            seen = seen | (bias > SKIP_BIAS).to(tl.int32)
        all_masked = tl.max(seen, axis=0) == 0

    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        if HAS_BIAS:
            bias = tl.load(b_base + offs_l * s_bl, mask=mask_l, other=float("-inf")).to(tl.float32)
            run = all_masked | (tl.max(bias, axis=0) > SKIP_BIAS)
        else:
            run = True
        if run:
            k0 = tl.load(k_base + offs_l[None, :] * s_kl + d0[:, None] * s_kd,
                         mask=mask_l[None, :] & (d0 < D)[:, None], other=0.0)  # (D0, BLOCK_L)
            v0 = tl.load(v_base + offs_l[:, None] * s_vl + d0[None, :] * s_vd,
                         mask=mask_l[:, None] & (d0 < D)[None, :], other=0.0)  # (BLOCK_L, D0)
            if UPCAST:
                k0 = k0.to(tl.float32)
                v0 = v0.to(tl.float32)
            s = tl.dot(q0, k0, input_precision=PRECISION)  # (BLOCK_M, BLOCK_L) float32
            if D1 > 0:
                k1 = tl.load(k_base + offs_l[None, :] * s_kl + d1[:, None] * s_kd,
                             mask=mask_l[None, :] & (d1 < D)[:, None], other=0.0)
                v1 = tl.load(v_base + offs_l[:, None] * s_vl + d1[None, :] * s_vd,
                             mask=mask_l[:, None] & (d1 < D)[None, :], other=0.0)
                if UPCAST:
                    k1 = k1.to(tl.float32)
                    v1 = v1.to(tl.float32)
                s += tl.dot(q1, k1, input_precision=PRECISION)
            s = s * qk_scale  # log2 units
            if HAS_BIAS:
                s += bias[None, :] * LOG2E
            s = tl.where(mask_l[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of -inf biases: no NaN from -inf - -inf
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=PRECISION)
            if D1 > 0:
                acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PRECISION)
            m_i = m_new

    inv = 1.0 / l_i
    o_base = o_ptr + b * s_ob + h * s_oh
    tl.store(o_base + offs_m[:, None] * s_on + d0[None, :] * s_od, (acc0 * inv[:, None]).to(o_ptr.dtype.element_ty),
             mask=mask_m[:, None] & (d0 < D)[None, :])
    if D1 > 0:
        tl.store(o_base + offs_m[:, None] * s_on + d1[None, :] * s_od,
                 (acc1 * inv[:, None]).to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & (d1 < D)[None, :])
