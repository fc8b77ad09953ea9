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
pure-torch version (the numerical reference for any fused kernel).
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


def preload() -> None:
    """Resolve the Triton entry point now when CUDA is present (before torch.compile traces a call)."""
    if _backend != "torch" and torch.cuda.is_available():
        _triton()


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
