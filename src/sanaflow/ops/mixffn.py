"""Dispatch of the Mix-FFN middle (SiLU, depthwise 3x3, GLU) to the fused Triton kernel.

The fused kernel (`sanaflow.ops.triton_mixffn.fused_dwconv_glu`) is opt-in until a GPU run
validates and times it: the model uses it only when ``SANAFLOW_FUSED_MIXFFN=1`` is set (read once at
import), the activation is on CUDA, triton is installed and autograd is not recording (the kernel
has no backward). triton is imported only when switched on (or on first use), so default imports stay light.
"""

from __future__ import annotations

import os

import torch

FUSED_MIXFFN = os.environ.get("SANAFLOW_FUSED_MIXFFN", "0") == "1"


def _load():
    from .triton_mixffn import fused_dwconv_glu, triton_available  # imports without triton too

    return fused_dwconv_glu if triton_available() else False


# fused_dwconv_glu, or False without triton. Resolved at import when switched on, so that a
# torch.compile'd model never traces the import; otherwise on first use (tests' `enabled=True`).
_fused_fn = _load() if FUSED_MIXFFN else None


def fused_mixffn_fn(h: torch.Tensor, weight: torch.Tensor, enabled: bool | None = None):
    """`fused_dwconv_glu` when it applies to activation `h` (B, N, 2h) and conv `weight`, else None.

    `enabled` overrides the SANAFLOW_FUSED_MIXFFN switch (tests).
    """
    global _fused_fn
    if not (FUSED_MIXFFN if enabled is None else enabled) or not h.is_cuda:
        return None
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return None  # forward-only kernel: autograd would lose the graph
    if _fused_fn is None:
        _fused_fn = _load()
    return _fused_fn or None
