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

``SANAFLOW_CROSS_ATTENTION`` (auto | torch | triton) or `set_backend` chooses the CUDA inference
kernel. "torch" is SDPA, which picks cuDNN attention on Hopper; "auto" (the default) is the
measured-faster one, which is SDPA today. "triton" is our kernel
(`sanaflow.ops.triton_cross_attention`: SANA's 72- and 112-wide heads without padding them to 128,
the caption's padded key blocks skipped). On an H100 it loses to cuDNN at every SANA shape (600M at
4096 px, CFG mask: 0.33 ms vs 0.31 ms; unmasked 0.37 vs 0.22) and beats SDPA's memory-efficient
backend 2-2.7x (``benchmarks/bench_cross_attention.py``); it is there for GPUs and torch builds
where SDPA has no cuDNN or flash kernel for the shape. Inputs it does not take (a per-head or per-query
bias, float64) run SDPA; "triton" without triton installed raises.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("SANAFLOW_CROSS_ATTENTION", "auto")


def set_backend(name: str) -> None:
    """Choose the CUDA inference implementation of `attend_tokens`: auto (SDPA today), torch (SDPA) or triton."""
    global _backend
    if name not in BACKENDS:
        from ..errors import unknown_choice

        raise unknown_choice("cross-attention backend", name, BACKENDS)
    _backend = name


def _triton_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The Triton kernel's (B, N, h * d) output when the backend allows it and it takes the inputs, else None."""
    if _backend != "triton" or not q.is_cuda:
        return None
    from . import triton_cross_attention as tca

    if not tca.triton_available():
        from ..errors import SanaflowError

        raise SanaflowError("cross-attention backend 'triton' requested but triton is not installed "
                            "(pip install triton, or SANAFLOW_CROSS_ATTENTION=torch)")
    if tca.supports(q, k, v, bias):
        return tca.cross_attention_triton(q, k, v, bias)
    return None  # a per-head or per-query bias, float64, ...: SDPA


@torch.library.custom_op("sanaflow::attend_tokens", mutates_args=())
def _attend_tokens_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    fast = _triton_call(q, k, v, bias)
    if fast is not None:
        return fast
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
    if q.is_cuda and not torch.is_grad_enabled():
        if torch.compiler.is_compiling():
            return _attend_tokens_op(q, k, v, bias)
        fast = _triton_call(q, k, v, bias)
        if fast is not None:
            return fast
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, N, d)
    return out.transpose(1, 2).flatten(2)
