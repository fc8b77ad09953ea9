"""Triton kernels of the fused ReLU linear attention (imported only when triton is installed).

The four kernels are plain functions here; `sanaflow.ops.triton_linear_attention` compiles them
with ``triton.jit`` for CUDA tensors and wraps them in Triton's interpreter for CPU tensors, so the
same source is tested on a CPU-only machine.

Notation per (batch, head): ``qr = relu(q)`` (N, d), ``kr = relu(k)`` (M, d), ``kv = kr^T v`` (d, d),
``ks = sum_m kr_m`` (d), ``num = qr kv``, ``den = qr . ks + eps``, ``out = num / den``.
All loads are upcast to float32 at once (the interpreter mishandles bf16 arithmetic, and bf16/fp16
values are exact in float32 and tf32); ``PRECISION`` is the dots' input precision, chosen by the host.
"""

from __future__ import annotations

import triton.language as tl


def kv_partial_kernel(
    k_ptr, v_ptr, kv_ptr, ks_ptr,
    H, M, D, chunk,
    s_kb, s_kh, s_km, s_kd,
    s_vb, s_vh, s_vm, s_vd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partial kv = relu(k)^T v and ks = sum relu(k) over one chunk of keys; grid (B*H, splits)."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    b = (pid_bh // H).to(tl.int64)  # int64 base offsets: B*N*h*d may pass 2**31
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    ks = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start = pid_s * chunk
    end = tl.minimum(start + chunk, M)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < end)[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_m[:, None] * s_km + offs_d[None, :] * s_kd, mask=mask, other=0.0)
        v = tl.load(v_base + offs_m[:, None] * s_vm + offs_d[None, :] * s_vd, mask=mask, other=0.0)
        kr = tl.maximum(k.to(tl.float32), 0.0)  # (BLOCK_M, BLOCK_D)
        acc += tl.dot(tl.trans(kr), v.to(tl.float32), input_precision=PRECISION)  # (BLOCK_D, BLOCK_D)
        ks += tl.sum(kr, axis=0)
    out = (pid_bh * n_split + pid_s) * BLOCK_D
    dd = offs_d[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(kv_ptr + out * BLOCK_D + dd, acc)
    tl.store(ks_ptr + out + offs_d, ks)


def attn_out_kernel(
    q_ptr, kv_ptr, ks_ptr, o_ptr,
    H, N, D, eps,
    s_qb, s_qh, s_qn, s_qd,
    s_ob, s_oh, s_on, s_od,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """out = relu(q) kv / (relu(q) . ks + eps) for one block of queries; grid (B*H, cdiv(N, BLOCK_N))."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 base offsets: B*N*h*d may pass 2**31
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    kv = tl.load(kv_ptr + pid_bh * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :])
    ks = tl.load(ks_ptr + pid_bh * BLOCK_D + offs_d)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_n[:, None] * s_qn + offs_d[None, :] * s_qd, mask=mask, other=0.0)
    qr = tl.maximum(q.to(tl.float32), 0.0)  # (BLOCK_N, BLOCK_D)
    num = tl.dot(qr, kv, input_precision=PRECISION)  # (BLOCK_N, BLOCK_D)
    den = tl.sum(qr * ks[None, :], axis=1) + tl.cast(eps, tl.float32)  # (BLOCK_N,); float32 even if eps came as float64
    out = num / den[:, None]
    o_ptrs = o_ptr + b * s_ob + h * s_oh + offs_n[:, None] * s_on + offs_d[None, :] * s_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask)


def bwd_q_kernel(
    q_ptr, g_ptr, kv_ptr, ks_ptr, dq_ptr, dkv_ptr, dks_ptr,
    H, N, D, eps, chunk,
    s_qb, s_qh, s_qn, s_qd,
    s_gb, s_gh, s_gn, s_gd,
    s_dqb, s_dqh, s_dqn, s_dqd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq for a chunk of queries, and partial dkv = qr^T dnum, dks = qr^T dden; grid (B*H, splits)."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    b = (pid_bh // H).to(tl.int64)  # int64 base offsets: B*N*h*d may pass 2**31
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    kv = tl.load(kv_ptr + pid_bh * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :])
    ks = tl.load(ks_ptr + pid_bh * BLOCK_D + offs_d)
    q_base = q_ptr + b * s_qb + h * s_qh
    g_base = g_ptr + b * s_gb + h * s_gh
    dq_base = dq_ptr + b * s_dqb + h * s_dqh
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    dks = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start = pid_s * chunk
    end = tl.minimum(start + chunk, N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < end)[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_n[:, None] * s_qn + offs_d[None, :] * s_qd, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_base + offs_n[:, None] * s_gn + offs_d[None, :] * s_gd, mask=mask, other=0.0).to(tl.float32)
        qr = tl.maximum(q, 0.0)  # (BLOCK_N, BLOCK_D)
        num = tl.dot(qr, kv, input_precision=PRECISION)  # (BLOCK_N, BLOCK_D)
        den = tl.sum(qr * ks[None, :], axis=1) + tl.cast(eps, tl.float32)  # (BLOCK_N,); float32 even if eps came as float64
        dnum = g / den[:, None]  # d loss / d num
        dden = -tl.sum(dnum * num, axis=1) / den  # d loss / d den = -sum_e g out / den
        dqr = tl.dot(dnum, tl.trans(kv), input_precision=PRECISION) + dden[:, None] * ks[None, :]
        dq = tl.where(q > 0.0, dqr, 0.0)  # relu'(q); 0 at q == 0 like torch
        tl.store(dq_base + offs_n[:, None] * s_dqn + offs_d[None, :] * s_dqd, dq.to(dq_ptr.dtype.element_ty), mask=mask)
        acc += tl.dot(tl.trans(qr), dnum, input_precision=PRECISION)  # (BLOCK_D, BLOCK_D)
        dks += tl.sum(qr * dden[:, None], axis=0)
    out = (pid_bh * n_split + pid_s) * BLOCK_D
    tl.store(dkv_ptr + out * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :], acc)
    tl.store(dks_ptr + out + offs_d, dks)


def bwd_kv_kernel(
    k_ptr, v_ptr, dkv_ptr, dks_ptr, dk_ptr, dv_ptr,
    H, M, D,
    s_kb, s_kh, s_km, s_kd,
    s_vb, s_vh, s_vm, s_vd,
    s_dkb, s_dkh, s_dkm, s_dkd,
    s_dvb, s_dvh, s_dvm, s_dvd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """dk = relu'(k) (v dkv^T + dks), dv = relu(k) dkv for one block of keys; grid (B*H, cdiv(M, BLOCK_M))."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 base offsets: B*N*h*d may pass 2**31
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (offs_m < M)[:, None] & (offs_d < D)[None, :]
    dkv = tl.load(dkv_ptr + pid_bh * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :])
    dks = tl.load(dks_ptr + pid_bh * BLOCK_D + offs_d)
    k = tl.load(k_ptr + b * s_kb + h * s_kh + offs_m[:, None] * s_km + offs_d[None, :] * s_kd,
                mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * s_vb + h * s_vh + offs_m[:, None] * s_vm + offs_d[None, :] * s_vd,
                mask=mask, other=0.0).to(tl.float32)
    kr = tl.maximum(k, 0.0)  # (BLOCK_M, BLOCK_D)
    dkr = tl.dot(v, tl.trans(dkv), input_precision=PRECISION) + dks[None, :]
    dk = tl.where(k > 0.0, dkr, 0.0)
    dv = tl.dot(kr, dkv, input_precision=PRECISION)
    tl.store(dk_ptr + b * s_dkb + h * s_dkh + offs_m[:, None] * s_dkm + offs_d[None, :] * s_dkd,
             dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + b * s_dvb + h * s_dvh + offs_m[:, None] * s_dvm + offs_d[None, :] * s_dvd,
             dv.to(dv_ptr.dtype.element_ty), mask=mask)
