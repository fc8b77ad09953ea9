"""Dispatch of the Mix-FFN middle (SiLU, depthwise 3x3, GLU) to the fused Triton kernel.

The fused kernel (`sanaflow.ops.triton_mixffn.fused_dwconv_glu`) runs by default when the activation
is on CUDA, triton is installed and autograd is not recording (the kernel has no backward): on an
H200 it made the 1600M transformer step at 4096 px 1.17x faster and its peak 1.7 GiB smaller
(BENCHMARKS.md). ``SANAFLOW_FUSED_MIXFFN=0`` (or false / off / no) switches it off (the torch path everywhere);
unset or any other value leaves it on; the variable is read once at import. triton is imported on first CUDA use (or by
`preload`, which `torch.compile` callers run first so that the compiled graph never traces an import),
so CPU imports stay light.
"""

from __future__ import annotations

import os

import torch

FUSED_MIXFFN = os.environ.get("SANAFLOW_FUSED_MIXFFN", "1").strip().lower() not in ("0", "false", "off", "no")

# fused_dwconv_glu, or False without triton; None until resolved.
_fused_fn = None


def _load():
    from .triton_mixffn import fused_dwconv_glu, triton_available  # imports without triton too

    return fused_dwconv_glu if triton_available() else False


def _resolve():
    """fused_dwconv_glu or False, imported on the first call."""
    global _fused_fn
    if _fused_fn is None:
        _fused_fn = _load()
    return _fused_fn


def preload() -> None:
    """Resolve the kernel now (imports triton when switched on and CUDA is present)."""
    if FUSED_MIXFFN and torch.cuda.is_available():
        _resolve()


def fused_mixffn_fn(h: torch.Tensor, weight: torch.Tensor, enabled: bool | None = None):
    """`fused_dwconv_glu` when it applies to activation `h` (B, N, 2h) and conv `weight`, else None.

    `enabled` overrides the SANAFLOW_FUSED_MIXFFN switch (tests).
    """
    if not (FUSED_MIXFFN if enabled is None else enabled) or not h.is_cuda:
        return None
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return None  # forward-only kernel: autograd would lose the graph
    return _resolve() or None
