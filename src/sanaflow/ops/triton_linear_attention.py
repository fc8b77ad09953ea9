"""Fused ReLU linear attention in Triton, forward and backward (the CUDA fast path).

Same function, layout and dtype rules as `sanaflow.ops.linear_attention.linear_attention_reference`:
q (B, h, N, d), k/v (B, h, M, d) in one of float32 / float16 / bfloat16, any strides (views of a
(B, N, h*d) projection are read in place); the result (B, h, N, d) has q's dtype and is stored as a
(B, N, h, d) tensor viewed as (B, h, N, d), so that flattening the heads back is free.

Two passes instead of the reference's five kernels and its float32 copies of q, k, v:
  1. kv = relu(k)^T v (d, d) and ks = sum relu(k) (d), accumulated in float32, the keys split into
     chunks so that B*h*splits programs fill the GPU; the partial sums are added in torch.
  2. out = relu(q) kv / (relu(q) . ks + eps), one query block per program.
The backward recomputes num/den from q (no activation is stored besides the (d, d) kv) and is two
passes again: dq with partial dkv/dks, then dk and dv.

Numerics: tiles are upcast to float32 on load; for float32 inputs every dot is full IEEE float32;
for half inputs the kv = relu(k)^T v dot runs in tf32, which is exact there (a bf16 or fp16
mantissa fits in tf32's), and the dots with float32 intermediates (kv, dnum, dkv) in 3xTF32
(see `_meta` for why plain tf32 is not enough).

CPU tensors run the same kernels in Triton's interpreter (slow, for tests only); that needs
``TRITON_INTERPRET=1`` in the environment before triton is first imported, because triton decides
at import whether its own library functions (``tl.zeros``, ``tl.sum``) are compiled or interpreted.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .linear_attention import NORMALISER_EPS

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Programs wanted in the split passes: a few per SM on an H100 (132 SMs), so that B*h (72..140 for
# SANA with CFG) programs do not leave the GPU half idle at 1024px.
_TARGET_PROGRAMS = 528
_TARGET_PROGRAMS_INTERPRETER = 2  # the interpreter runs programs one after another: few, long ones
# Up to this many tokens a reduction runs unsplit: its one program per (batch, head) takes a few
# microseconds on the GPU, while the split partials' two sums would cost ~30 us of host time (a
# 1024 px step is bound by the host's launches, not the GPU).
_SINGLE_SPLIT_TOKENS = 2048
_BLOCK = 128  # tokens per tile (head dim 32: a 128x32 float32 tile is 16 KiB of registers)
_NUM_WARPS = 4
_NUM_WARPS_BWD = 8  # the backward kernels hold ~7 live (128, 32) float32 tiles: 8 warps avoid spills


try:  # triton is optional: without it this module imports, and only the functions below refuse
    import triton

    from . import _linear_attention_kernels as _src
except ImportError:
    triton = None
    _KERNELS = None
else:
    # Module-level JIT objects (not built in a cached function) so torch.compile traces the launches.
    _KERNELS = tuple(triton.jit(f) for f in (_src.kv_partial_kernel, _src.attn_out_kernel,
                                             _src.bwd_q_kernel, _src.bwd_kv_kernel))


def triton_available(device: str | torch.device | None = None) -> bool:
    """True when triton is installed and `device` (default: the current CUDA device) is a CUDA GPU."""
    if _KERNELS is None or not torch.cuda.is_available():
        return False
    return device is None or torch.device(device).type == "cuda"


def triton_interpreting() -> bool:
    """True when triton was imported with ``TRITON_INTERPRET=1`` (the kernels then run on CPU tensors)."""
    if _KERNELS is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    # triton decides at import whether its library functions are compiled or interpreted
    return isinstance(triton.language.standard.zeros, InterpretedFunction) and isinstance(
        _KERNELS[0], InterpretedFunction)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError(f"linear attention wants q, k, v of shape (B, heads, tokens, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, _, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != d:
        raise InputError(f"linear attention: k and v must be (B={B}, heads={H}, M, d={d}) like q; got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"fused linear attention needs q, k, v of one dtype among float32, float16, bfloat16; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if d > 256:
        raise InputError(f"fused linear attention supports head dim <= 256; got {d}")
    if _KERNELS is None:
        raise InputError("fused linear attention needs triton (pip install triton); use "
                         "sanaflow.ops.linear_attention.linear_attention instead")
    if not q.is_cuda and not triton_interpreting():
        raise InputError(f"fused linear attention runs on CUDA tensors (got {q.device}); on CPU it runs only "
                         "in Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)")


def _meta(x: torch.Tensor, inputs_only: bool = False) -> dict:
    """Block size of the head dim and the precision of the kernel's dots.

    float32 inputs: IEEE float32 dots. Half inputs: a dot of two (upcast) input tiles is exact in
    tf32; a dot with a float32 intermediate (kv, dnum, dkv) uses 3xTF32 (about float32 accuracy),
    because plain tf32 (2**-11) is not enough for the backward, whose two terms cancel when v has
    a large mean (relative dq error 4% at mean/std = 3 in a simulation, 1e-5 with 3xTF32).
    """
    block_d = max(16, 1 << (x.shape[-1] - 1).bit_length())  # tl.dot needs power-of-2 sizes >= 16
    if x.dtype == torch.float32:
        precision = "ieee"
    else:
        precision = "tf32" if inputs_only else "tf32x3"
    return {"BLOCK_D": block_d, "PRECISION": precision}


def _splits(bh: int, tokens: int, on_gpu: bool) -> tuple[int, int]:
    """(number of splits, tokens per split) for a pass that reduces over `tokens`."""
    blocks = triton_cdiv(tokens, _BLOCK)
    if on_gpu and tokens <= _SINGLE_SPLIT_TOKENS:
        return 1, blocks * _BLOCK
    target = _TARGET_PROGRAMS if on_gpu else _TARGET_PROGRAMS_INTERPRETER
    splits = max(1, min(blocks, triton_cdiv(target, bh)))
    chunk = triton_cdiv(blocks, splits) * _BLOCK
    return triton_cdiv(tokens, chunk), chunk


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division of positive ints."""
    return -(-a // b)


def _kv_forward(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kv (B*h, D, D) and ks (B*h, D) in float32, D the padded head dim."""
    kv_kernel = _KERNELS[0]
    B, H, M, d = k.shape
    meta = _meta(k, inputs_only=True)
    D = meta["BLOCK_D"]
    splits, chunk = _splits(B * H, M, k.is_cuda)
    kv = torch.empty(B * H, splits, D, D, device=k.device, dtype=torch.float32)  # (BH, S, D, D)
    ks = torch.empty(B * H, splits, D, device=k.device, dtype=torch.float32)  # (BH, S, D)
    kv_kernel[(B * H, splits)](
        k, v, kv, ks, H, M, d, chunk, *k.stride(), *v.stride(),
        BLOCK_M=_BLOCK, num_warps=_NUM_WARPS, **meta,
    )
    if splits == 1:
        return kv[:, 0], ks[:, 0]
    return kv.sum(1), ks.sum(1)  # (BH, D, D), (BH, D): fixed order, deterministic


def _forward(q, k, v, eps):
    out_kernel = _KERNELS[1]
    B, H, N, d = q.shape
    kv, ks = _kv_forward(k, v)
    out = torch.empty(B, N, H, d, device=q.device, dtype=q.dtype).transpose(1, 2)  # (B, h, N, d) view
    out_kernel[(B * H, triton_cdiv(N, _BLOCK))](
        q, kv, ks, out, H, N, d, eps, *q.stride(), *out.stride(),
        BLOCK_N=_BLOCK, num_warps=_NUM_WARPS, **_meta(q),
    )
    return out, kv, ks


def _backward(q, k, v, kv, ks, g, eps):
    _, _, bwd_q, bwd_kv = _KERNELS
    B, H, N, d = q.shape
    M = k.shape[2]
    meta = _meta(q)
    D = meta["BLOCK_D"]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    splits, chunk = _splits(B * H, N, q.is_cuda)
    dkv = torch.empty(B * H, splits, D, D, device=q.device, dtype=torch.float32)  # (BH, S, D, D)
    dks = torch.empty(B * H, splits, D, device=q.device, dtype=torch.float32)  # (BH, S, D)
    bwd_q[(B * H, splits)](
        q, g, kv, ks, dq, dkv, dks, H, N, d, eps, chunk, *q.stride(), *g.stride(), *dq.stride(),
        BLOCK_N=_BLOCK, num_warps=_NUM_WARPS_BWD, **meta,
    )
    dkv, dks = (dkv[:, 0], dks[:, 0]) if splits == 1 else (dkv.sum(1), dks.sum(1))
    bwd_kv[(B * H, triton_cdiv(M, _BLOCK))](
        k, v, dkv, dks, dk, dv, H, M, d, *k.stride(), *v.stride(), *dk.stride(), *dv.stride(),
        BLOCK_M=_BLOCK, num_warps=_NUM_WARPS_BWD, **meta,
    )
    return dq, dk, dv


class _LinearAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v and the small float32 kv / ks; recomputes the rest."""

    @staticmethod
    def forward(ctx, q, k, v, eps):
        out, kv, ks = _forward(q, k, v, eps)
        ctx.save_for_backward(q, k, v, kv, ks)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, kv, ks = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, kv, ks, g, ctx.eps)
        return dq, dk, dv, None


def linear_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = NORMALISER_EPS) -> torch.Tensor:
    """Fused ReLU linear attention: q (B,h,N,d), k/v (B,h,M,d) -> (B,h,N,d) in q's dtype (fp32 accumulation)."""
    _check(q, k, v)
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[0] * q.shape[1] == 0:
        raise InputError(f"linear attention needs at least one query and one key; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _LinearAttention.apply(q, k, v, eps)
    return _forward(q, k, v, eps)[0]  # inference: no autograd node (~10 us of host time less)
