"""Plug-and-play (PnP) injection: which steps inject, and the module hook that injects features."""

from __future__ import annotations

from typing import Any

import torch

from .attention import NUM_BRANCHES, Pass, TokenFlowState


def injection_steps(num_steps: int, fraction: float) -> int:
    """Number of leading denoising steps that inject (PnP's `pnp_f_t` / `pnp_attn_t` thresholds)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"PnP injection fraction must lie in [0, 1], got {fraction}")
    return int(num_steps * fraction)


class FeatureInjectionHook:
    """Forward hook: the edit branches' output of a module is replaced by the source branch's.

    Placed on the last layer of a residual branch (SD: ``conv2`` of one decoder ResNet; SANA: the
    Mix-FFN of one middle block), so the skip connection of each branch is kept and only the residual
    features come from the source video. The module must be *called* by its parent (forward hooks do
    not see a method such as ``forward_tokens`` invoked directly).
    """

    def __init__(self, state: TokenFlowState):
        self.state = state

    def __call__(self, module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        state = self.state
        if state.mode is Pass.PLAIN or not state.inject_features:
            return None
        n = state.frames
        return torch.cat([output[:n]] * NUM_BRANCHES)
