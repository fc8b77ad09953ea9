"""Optimizers (AdamW, CAME), the learning-rate schedule and the EMA of weights."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import unknown_choice
from .config import LR_SCHEDULES, OPTIMIZERS, OptimConfig


class CAME(torch.optim.Optimizer):
    """CAME (Luo et al. 2023): Adafactor-style factored second moments plus a factored confidence term.

    Matrices (and conv kernels, over their last two dims) keep row/column statistics only, which is
    what makes it memory-efficient; vectors fall back to an Adam-like unfactored second moment.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16),
                 clip_threshold: float = 1.0, weight_decay: float = 0.0):
        if len(betas) == 2:  # an AdamW-style pair from the config: add CAME's confidence beta
            betas = (*betas, 0.9999)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=tuple(eps), clip_threshold=clip_threshold,
                                      weight_decay=weight_decay))

    @staticmethod
    def _approx(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        # Rank-1 reconstruction of a factored statistic: r c^T / mean(r).
        r = (row / row.mean(dim=-1, keepdim=True)).unsqueeze(-1)  # (..., R, 1)
        return r * col.unsqueeze(-2)  # (..., R, C)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimisation step."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2, b3 = group["betas"]
            eps1, eps2 = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                factored = g.dim() >= 2
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(g)
                    if factored:
                        shape = g.shape
                        state["row"] = g.new_zeros(shape[:-1])
                        state["col"] = g.new_zeros(shape[:-2] + shape[-1:])
                        state["conf_row"] = g.new_zeros(shape[:-1])
                        state["conf_col"] = g.new_zeros(shape[:-2] + shape[-1:])
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(g)
                state["step"] += 1
                sq = g * g + eps1
                if factored:
                    state["row"].mul_(b2).add_(sq.mean(dim=-1), alpha=1 - b2)
                    state["col"].mul_(b2).add_(sq.mean(dim=-2), alpha=1 - b2)
                    update = g * self._approx(state["row"], state["col"]).rsqrt()
                else:
                    state["exp_avg_sq"].mul_(b2).add_(sq, alpha=1 - b2)
                    update = g * state["exp_avg_sq"].rsqrt()
                rms = update.pow(2).mean().sqrt()
                update.div_((rms / group["clip_threshold"]).clamp_min(1.0))
                m = state["exp_avg"].mul_(b1).add_(update, alpha=1 - b1)
                if factored:
                    conf = (update - m).pow(2) + eps2
                    state["conf_row"].mul_(b3).add_(conf.mean(dim=-1), alpha=1 - b3)
                    state["conf_col"].mul_(b3).add_(conf.mean(dim=-2), alpha=1 - b3)
                    update = m * self._approx(state["conf_row"], state["conf_col"]).rsqrt()
                else:
                    update = m.clone()
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW or CAME over `params`, from the config; `fused` = AdamW's single-kernel CUDA step."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, fused=fused or None)
    if cfg.name == "came":
        return CAME(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise unknown_choice("optimizer", cfg.name, OPTIMIZERS)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the base LR at `step`: linear warmup, then constant / cosine / linear decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * frac))
    elif cfg.schedule == "linear":
        decay = 1 - frac
    else:
        raise unknown_choice("lr schedule", cfg.schedule, LR_SCHEDULES)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """A LambdaLR stepping once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, max_steps))


def _full(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 shards parameters as DTensors; the EMA keeps full float32 copies.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class EMA:
    """Exponential moving average of a network's parameters, kept in a float32 copy of the network.

    The decay warms up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the
    random initialisation. Buffers are copied, not averaged.
    """

    def __init__(self, net: nn.Module, decay: float):
        self.decay = decay
        # A fresh instance from the config (ModelMixin) rather than deepcopy: same class, same weights.
        self.model = type(net)(**net.config).float().eval().requires_grad_(False)
        self.model.load_state_dict(net.state_dict())

    def current_decay(self, step: int) -> float:
        """The decay used at optimizer step `step` (0-based)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        """Move the average towards `net` (same architecture; a DDP/FSDP-wrapped net's inner module)."""
        d = self.current_decay(step)
        ema_p = [p for _, p in self.model.named_parameters()]
        src = [_full(p.detach()).float() for _, p in net.named_parameters()]
        torch._foreach_lerp_(ema_p, src, 1 - d)
        for (_, b_ema), (_, b) in zip(self.model.named_buffers(), net.named_buffers()):
            b_ema.copy_(_full(b))
