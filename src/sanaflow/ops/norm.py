"""Dispatch of the blocks' (residual +) LayerNorm + modulation to the fused Triton kernel.

`norm_modulate(norm, x, shift, scale, residual)` returns (x', h) with x' = x + residual (x without
one) and h = norm(x') * (1 + scale) + shift. The fused kernel (`sanaflow.ops.triton_norm`) runs when
the tokens are on CUDA, triton is installed, autograd is not recording (forward only), the norm is
a LayerNorm without affine parameters (SANA's) and nothing hooks it; otherwise the torch path runs.
``SANAFLOW_FUSED_NORM=0`` (or false / off / no) switches the kernel off; read once at import.
"""

from __future__ import annotations

import os

import torch
from torch import nn

FUSED_NORM = os.environ.get("SANAFLOW_FUSED_NORM", "1").strip().lower() not in ("0", "false", "off", "no")

_fused_fn = None  # triton_norm.norm_modulate, or False without triton; None until resolved


def _resolve():
    global _fused_fn
    if _fused_fn is None:
        from .triton_norm import norm_modulate, triton_available  # imports without triton too

        _fused_fn = norm_modulate if triton_available() else False
    return _fused_fn


def _interpreting() -> bool:
    from .triton_norm import _INTERPRETING

    return _INTERPRETING


def preload() -> None:
    """Resolve the kernel now (imports triton when switched on and CUDA is present)."""
    if FUSED_NORM and torch.cuda.is_available():
        _resolve()


def _fusable(norm: nn.Module, x: torch.Tensor, enabled: bool | None) -> bool:
    if not (FUSED_NORM if enabled is None else enabled):
        return False
    if not x.is_cuda and not (enabled is True and _interpreting()):  # CPU: only tests, in Triton's interpreter
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False  # forward-only kernel
    return (type(norm) is nn.LayerNorm and norm.weight is None and norm.bias is None
            and len(norm.normalized_shape) == 1 and not norm._forward_hooks and not norm._forward_pre_hooks)


def norm_modulate(
    norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    residual: torch.Tensor | None = None, enabled: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, norm(x + residual) * (1 + scale) + shift) for tokens (B, N, D), shift / scale (B, 1, D).

    `enabled` overrides the SANAFLOW_FUSED_NORM switch (tests; True also runs CPU tokens in Triton's
    interpreter when it is on).
    """
    if _fusable(norm, x, enabled):
        fused = _resolve()
        if fused:
            return fused(x, shift, scale, norm.eps, residual)
    if residual is not None:
        x = x + residual
    return x, torch.addcmul(shift, norm(x), 1 + scale).to(x.dtype)
