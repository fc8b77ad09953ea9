"""Cross-attention to caption tokens whose output comes back token-major, without layout copies.

SANA's cross-attention has queries from the image tokens, split into heads as a strided view
(B, heads, N, d) of the (B, N, heads * d) projection. Eager `F.scaled_dot_product_attention` takes
that view as it is, but inductor lowers the call with contiguous-query constraints and inserts a
copy of the queries in front of every cuDNN attention (at 4096 px with the 1600M model: ~0.1 ms per
block, 2 ms per step, measured by ``benchmarks/profile_step.py --compile``). `attend_tokens` runs
the attention as an opaque custom op in compiled CUDA inference, so the compiled graph hands the
view over unchanged; the op returns the (B, N, heads * d) tokens the output projection wants. Eager
calls (SDPA takes the view there; a custom op's dispatch would only add host time), training (the
op has no backward) and CPU tensors run the plain call, the same arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("sanaflow::attend_tokens", mutates_args=())
def _attend_tokens_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, N, d)
    # A view when the kernel wrote token-major memory (as it does for token-major queries), else a copy.
    return out.transpose(1, 2).flatten(2).contiguous()  # (B, N, h * d)


@_attend_tokens_op.register_fake
def _(q, k, v, bias):
    b, h, n, _ = q.shape
    return q.new_empty((b, n, h * v.shape[-1]))


def attend_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of q (B, h, N, d) over k, v (B, h, L, d) with additive `bias` -> (B, N, h * d)."""
    # Only inside compiled CUDA inference: eager SDPA already takes the view, and a custom op's
    # dispatch would add host time to every eager call; the op has no backward (training).
    if q.is_cuda and torch.compiler.is_compiling() and not torch.is_grad_enabled():
        return _attend_tokens_op(q, k, v, bias)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, N, d)
    return out.transpose(1, 2).flatten(2)
