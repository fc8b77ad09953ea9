"""Dispatch of the blocks' (residual +) LayerNorm + modulation to the fused Triton kernel.

`norm_modulate(norm, x, shift, scale, residual)` returns (x', h) with x' = x + residual (x without
one; ``torch.addcmul(x, residual_gate, residual)`` with a gate) and h = norm(x') * (1 + scale) + shift. The fused kernel (`sanaflow.ops.triton_norm`) runs when
the tokens are on CUDA, triton is installed, autograd is not recording (forward only), the norm is
a LayerNorm without affine parameters (SANA's) and nothing hooks it; otherwise the torch path runs.
``SANAFLOW_FUSED_NORM=0`` (or false / off / no) switches the kernel off; read once at import.
`row_quantizer` hands fp8 layers (`sanaflow.quant.layers`) the same module's row-quantisation kernel,
and `norm_quantizer` / `residual_quantizer` the passes that write an activation as fp8 rows directly
(``quant.layers.norm_modulate_fp8`` / ``gated_residual_fp8``), under the same conditions and switch
as the fused norm: they return None where the torch path must run.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import InputError

FUSED_NORM = os.environ.get("SANAFLOW_FUSED_NORM", "1").strip().lower() not in ("0", "false", "off", "no")

_kernels = None  # the triton_norm module, or False without triton; None until resolved


def _resolve():
    """`sanaflow.ops.triton_norm` when triton is installed, else False (imported on first use)."""
    global _kernels
    if _kernels is None:
        from . import triton_norm  # imports without triton too

        _kernels = triton_norm if triton_norm.triton_available() else False
    return _kernels


def row_quantizer():
    """The one-pass per-row quantisation kernel (`triton_norm.quantize_rows`), or None without triton."""
    kernels = _resolve()
    return kernels.quantize_rows if kernels else None


def _interpreting() -> bool:
    from .triton_norm import _INTERPRETING

    return _INTERPRETING


def preload() -> None:
    """Resolve the kernels now (imports triton when CUDA is present; fp8 layers use the row quantisation
    even with the fused norm switched off)."""
    if torch.cuda.is_available():
        _resolve()


def _kernel_runs(enabled: bool | None, x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether a row kernel takes tokens `x` (and the other inputs): switched on, on CUDA, nothing to differentiate."""
    if not (FUSED_NORM if enabled is None else enabled):
        return False
    if not x.is_cuda and not (enabled is True and _interpreting()):  # CPU: only tests, in Triton's interpreter
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others)):
        return False  # forward-only kernels
    return True


def row_kernels_run(x: torch.Tensor) -> bool:
    """Whether the row kernels take tokens like `x`: switched on, triton installed, on CUDA, nothing to differentiate."""
    return _kernel_runs(None, x) and bool(_resolve())


def _fusable(norm: nn.Module, x: torch.Tensor, enabled: bool | None, *others: torch.Tensor | None) -> bool:
    return (_kernel_runs(enabled, x, *others) and type(norm) is nn.LayerNorm and norm.weight is None
            and norm.bias is None and len(norm.normalized_shape) == 1
            and not norm._forward_hooks and not norm._forward_pre_hooks)


def _norm_fusable(
    norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor | None,
    residual_gate: torch.Tensor | None, enabled: bool | None,
) -> bool:
    # a gate of another dtype would make addcmul promote: the torch path keeps that meaning
    return (_fusable(norm, x, enabled, shift, scale, residual, residual_gate)
            and (residual_gate is None or residual_gate.dtype == x.dtype))


def norm_quantizer(
    norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    residual: torch.Tensor | None = None, enabled: bool | None = None, residual_gate: torch.Tensor | None = None,
):
    """`triton_norm.norm_modulate_quantize` where `norm_modulate` would run its kernel on these inputs, else None."""
    if _norm_fusable(norm, x, shift, scale, residual, residual_gate, enabled):
        kernels = _resolve()
        if kernels:
            return kernels.norm_modulate_quantize
    return None


def residual_quantizer(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, enabled: bool | None = None):
    """`triton_norm.gated_residual_quantize` for x + gate * y when the row kernels run on these inputs, else None."""
    if _kernel_runs(enabled, x, gate, y) and x.dtype == gate.dtype == y.dtype:
        kernels = _resolve()
        if kernels:
            return kernels.gated_residual_quantize
    return None


def norm_modulate(
    norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    residual: torch.Tensor | None = None, enabled: bool | None = None, residual_gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', norm(x') * (1 + scale) + shift) for tokens (B, N, D), shift / scale (B, 1, D), x' = x + residual.

    With `residual_gate` (B, 1, D), x' = ``torch.addcmul(x, residual_gate, residual)``.
    `enabled` overrides the SANAFLOW_FUSED_NORM switch (tests; True also runs CPU tokens in Triton's
    interpreter when it is on).
    """
    if residual_gate is not None and residual is None:
        raise InputError("norm_modulate: a residual_gate needs a residual")
    if _norm_fusable(norm, x, shift, scale, residual, residual_gate, enabled):
        kernels = _resolve()
        if kernels:
            return kernels.norm_modulate(x, shift, scale, norm.eps, residual, residual_gate)
    if residual_gate is not None:
        x = torch.addcmul(x, residual_gate, residual)
    elif residual is not None:
        x = x + residual
    return x, torch.addcmul(shift, norm(x), 1 + scale).to(x.dtype)
