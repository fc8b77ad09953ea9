"""Guidance as wrappers around a model function: classifier-free guidance (CFG) and perturbed-attention guidance (PAG).

Contract. The wrapped (inner) model function is `model_fn(x, sigma, **cond, **extra) -> velocity`
where `cond` holds batch-first conditioning tensors (e.g. `encoder_hidden_states` (B, L, C) and
`encoder_attention_mask` (B, L)). The returned (guided) function is called by the solvers as
`guided(x, sigma, cond=..., uncond=..., **extra)`:

- `cond` / `uncond`: dicts with the same keys, each value batch-first with the batch size of x
  (the positive and the negative prompt's conditioning). Tensors are concatenated along the batch
  in the order [uncond, cond] (then [.., cond] again for PAG's perturbed branch), as diffusers
  does, and passed to the inner function as keyword arguments; non-tensor values must be equal
  in both and are passed once.
- every other keyword in `extra` goes to the inner function unchanged (not batched).

So the whole guidance step is ONE batched model call (2B rows for CFG, 3B for CFG + PAG).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigError
from .solvers import ModelFn

# Keyword the PAG wrapper adds to the inner call: a (N,) bool tensor, True on the rows of the perturbed
# branch. Those rows are always the last B of the batch (diffusers' layout: [uncond, cond, perturbed]).
PERTURBED_KEY = "perturbed"


def _cat_conditioning(parts: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate conditioning dicts along the batch; non-tensor values must agree."""
    keys = set(parts[0])
    for p in parts[1:]:
        if set(p) != keys:
            raise ConfigError(
                f"cond and uncond must have the same keys, got {sorted(parts[0])} and {sorted(p)}"
            )
    out: dict[str, Any] = {}
    for k in parts[0]:
        values = [p[k] for p in parts]
        if isinstance(values[0], torch.Tensor):
            out[k] = torch.cat(values, dim=0)
        elif all(v == values[0] for v in values[1:]):
            out[k] = values[0]
        else:
            raise ConfigError(f"non-tensor conditioning {k!r} differs between cond and uncond")
    return out


def _repeat_sigma(sigma: torch.Tensor, times: int) -> torch.Tensor:
    return sigma.repeat(times)  # (times * B,)


def _require_uncond(uncond: Mapping[str, Any] | None, scale: float) -> None:
    if uncond is None:
        raise ConfigError(f"classifier-free guidance with scale {scale} needs an `uncond` conditioning")


def _cfg_pair(
    model_fn: ModelFn, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any], uncond: Mapping[str, Any],
    extra: Mapping[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_uncond, v_cond) in float32 from ONE model call on the batch [uncond, cond]."""
    x_in = torch.cat([x, x])  # (2B, C, H, W)
    out = model_fn(x_in, _repeat_sigma(sigma, 2), **_cat_conditioning([uncond, cond]), **extra)  # (2B, ...)
    v_uncond, v_cond = out.float().chunk(2)
    return v_uncond, v_cond


def cfg(model_fn: ModelFn, scale: float) -> ModelFn:
    """Classifier-free guidance: uncond + scale (cond - uncond) from one batched call; scale 1 runs cond alone.

    (diffusers' SanaPipeline skips guidance entirely for scale <= 1; a pipeline that wants that
    behaviour should not wrap at all for scale < 1.)
    """

    def guided(
        x: torch.Tensor,
        sigma: torch.Tensor,
        *,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        if scale == 1.0:
            return model_fn(x, sigma, **cond, **extra).float()
        _require_uncond(uncond, scale)
        v_uncond, v_cond = _cfg_pair(model_fn, x, sigma, cond, uncond, extra)
        return v_uncond + scale * (v_cond - v_uncond)

    return guided


def pag(
    model_fn: ModelFn, guidance_scale: float, pag_scale: float, perturbed_fn: ModelFn | None = None
) -> ModelFn:
    """Perturbed-attention guidance (+ CFG): uncond + cfg (cond - uncond) + pag (cond - perturbed).

    As in diffusers' SanaPAGPipeline, CFG is on only for guidance_scale > 1; without it the result is
    cond + pag (cond - perturbed). The perturbed branch carries the positive conditioning and must be
    run with identity self-attention in the chosen transformer blocks. Two ways to get it:

    - `perturbed_fn=None` (default): ONE batched call. The inner function gets the batch
      [uncond, cond, perturbed] (or [cond, perturbed] without CFG) and the keyword
      `perturbed` = (N,) bool mask, True on the perturbed rows (always the last B); it must apply
      identity self-attention to exactly those rows.
    - `perturbed_fn` given: a model function with the same signature that runs the transformer with
      identity self-attention for its whole batch; it is called on the cond batch after one batched
      CFG call (two calls per step, for processors that cannot split a batch).

    pag_scale == 0 is exactly `cfg(model_fn, guidance_scale)`: no perturbed branch is run.
    """
    if pag_scale == 0.0:
        return cfg(model_fn, guidance_scale)
    use_cfg = guidance_scale > 1.0

    def guided(
        x: torch.Tensor,
        sigma: torch.Tensor,
        *,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        if use_cfg:
            _require_uncond(uncond, guidance_scale)
        if perturbed_fn is None:
            parts = [uncond, cond, cond] if use_cfg else [cond, cond]
            batch = x.shape[0]
            x_in = torch.cat([x] * len(parts))  # (kB, C, H, W)
            perturbed = torch.zeros(len(parts) * batch, dtype=torch.bool, device=x.device)  # (kB,)
            perturbed[-batch:] = True
            out = model_fn(
                x_in, _repeat_sigma(sigma, len(parts)), **_cat_conditioning(parts), **{PERTURBED_KEY: perturbed},
                **extra,
            ).float()  # (kB, C, H, W)
            chunks = out.chunk(len(parts))
        else:
            if use_cfg:
                chunks = _cfg_pair(model_fn, x, sigma, cond, uncond, extra)
            else:
                chunks = (model_fn(x, sigma, **cond, **extra).float(),)
            chunks = (*chunks, perturbed_fn(x, sigma, **cond, **extra).float())
        if use_cfg:
            v_uncond, v_cond, v_perturbed = chunks
            return v_uncond + guidance_scale * (v_cond - v_uncond) + pag_scale * (v_cond - v_perturbed)
        v_cond, v_perturbed = chunks
        return v_cond + pag_scale * (v_cond - v_perturbed)

    return guided


def guided_model(
    model_fn: ModelFn,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float = 1.0,
    pag_scale: float = 0.0,
    perturbed_fn: ModelFn | None = None,
) -> tuple[ModelFn, dict[str, Any]]:
    """Pick the guidance a pipeline needs, as diffusers' SANA pipelines do; returns (model_fn, extra_args).

    CFG only for guidance_scale > 1 (then `uncond` is required), PAG only for pag_scale > 0; with
    neither, the model runs once on `cond`. Pass the returned pair to any flow sampler.
    """
    use_cfg = guidance_scale > 1.0
    if use_cfg and uncond is None:
        raise ConfigError(f"classifier-free guidance with scale {guidance_scale} needs a negative conditioning")
    extra: dict[str, Any] = {"cond": cond}
    if use_cfg:
        extra["uncond"] = uncond
    if pag_scale > 0.0:
        return pag(model_fn, guidance_scale, pag_scale, perturbed_fn), extra
    return cfg(model_fn, guidance_scale if use_cfg else 1.0), extra
