"""ReLU linear attention, the self-attention of the SANA transformer.

Layout: ``q`` is (B, heads, N, d), ``k`` and ``v`` are (B, heads, M, d) (M may differ from N, e.g.
when keys and values are gathered from several frames). The kernel is ReLU: with
``phi = relu``, token n gets

    out_n = sum_m (phi(q_n) . phi(k_m)) v_m  /  sum_m (phi(q_n) . phi(k_m))

computed in O((N + M) d^2) by first forming ``phi(k)^T [v, 1]`` (d, d + 1): the extra column of
ones yields the normaliser in the same matmul as the numerator. Everything is accumulated in
float32 (bf16/fp16 sums over thousands of tokens lose too much), and the result is returned in the
dtype of ``q``.

`linear_attention` is the one entry point the models call; `linear_attention_reference` is the
pure-torch version (the numerical reference for any fused kernel). `output_quantizer` hands an fp8
output projection (``sanaflow.quant.layers.linear_attention_fp8``) the fused kernel's variant that
writes the merged heads as fp8 rows, where `linear_attention` would run the fused kernel.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

# Added to the normaliser: a query whose features are all zero after ReLU gets output 0, not NaN.
NORMALISER_EPS = 1e-15


def linear_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = NORMALISER_EPS
) -> torch.Tensor:
    """ReLU linear attention in pure torch: q (B,h,N,d), k/v (B,h,M,d) -> (B,h,N,d) in q's dtype."""
    out_dtype = q.dtype
    q = F.relu(q).float()  # (B, h, N, d)
    k = F.relu(k).float()  # (B, h, M, d)
    v = F.pad(v.float(), (0, 1), value=1.0)  # (B, h, M, d + 1): last column of ones -> normaliser
    kv = torch.matmul(k.transpose(-1, -2), v)  # (B, h, d, d + 1)
    out = torch.matmul(q, kv)  # (B, h, N, d + 1)
    out = out[..., :-1] / (out[..., -1:] + eps)  # (B, h, N, d)
    return out.to(out_dtype)


# Which implementation `linear_attention` uses: "auto" (Triton on CUDA when installed, else torch),
# "torch" or "triton". Read once at import from SANAFLOW_LINEAR_ATTENTION; set_backend changes it.
BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("SANAFLOW_LINEAR_ATTENTION", "auto")
_triton_fn = None  # the Triton entry point, imported on first CUDA use (keeps CPU imports light)
_quantize_fn = None  # its fp8-rows variant (`output_quantizer`), likewise


def set_backend(name: str) -> None:
    """Choose the implementation of `linear_attention`: auto, torch or triton."""
    global _backend
    if name not in BACKENDS:
        from ..errors import unknown_choice

        raise unknown_choice("linear-attention backend", name, BACKENDS)
    _backend = name


def _triton():
    global _triton_fn
    if _triton_fn is None:
        from .triton_linear_attention import linear_attention_triton, triton_available

        _triton_fn = linear_attention_triton if triton_available() else False
    return _triton_fn


def _triton_quantize():
    global _quantize_fn
    if _quantize_fn is None:
        from . import triton_linear_attention as kernels  # imports without triton too

        _quantize_fn = kernels.linear_attention_quantize if kernels.triton_installed() else False
    return _quantize_fn


def preload() -> None:
    """Resolve the Triton entry points now when CUDA is present (before torch.compile traces a call)."""
    if _backend != "torch" and torch.cuda.is_available():
        _triton()
        _triton_quantize()


def output_quantizer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enabled: bool | None = None):
    """`triton_linear_attention.linear_attention_quantize` where `linear_attention` would run the fused kernel
    on these inputs and nothing needs their gradients (a forward-only pass), else None.

    `enabled`: None follows the backend (any but "torch"); True also runs CPU tensors in Triton's
    interpreter (tests); False: None.
    """
    if enabled is False or (enabled is None and _backend == "torch"):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if not q.is_cuda and not (enabled is True and _interpreting()):
        return None
    return _triton_quantize() or None


def _interpreting() -> bool:
    from .triton_linear_attention import triton_interpreting

    return triton_interpreting()


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ReLU linear attention: q (B,h,N,d), k/v (B,h,M,d) -> (B,h,N,d) in q's dtype (fp32 accumulation).

    On CUDA the fused Triton kernel runs when triton is installed (backend "auto"); elsewhere, and
    with backend "torch", the pure-torch reference.
    """
    if _backend != "torch" and q.is_cuda:
        fn = _triton()
        if fn:
            return fn(q, k, v)
        if _backend == "triton":
            from ..errors import SanaflowError

            raise SanaflowError("linear-attention backend 'triton' requested but triton is not installed")
    return linear_attention_reference(q, k, v)
