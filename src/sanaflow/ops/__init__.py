"""Fused kernels (Triton on CUDA) with their torch reference paths; see each module."""

from __future__ import annotations


def preload_kernels() -> None:
    """Resolve every lazily imported Triton entry point now (CUDA present), before torch.compile traces a call."""
    from . import linear_attention, mixffn, norm

    linear_attention.preload()
    mixffn.preload()
    norm.preload()  # the fused norm and the fp8 row quantisation
