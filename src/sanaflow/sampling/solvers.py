"""Samplers: one contract in the style of k-diffusion, so solvers swap freely.

Every flow sampler is `sample_*(model_fn, x, sigmas, extra_args=None, callback=None, disable=None)`:

- `model_fn(x, sigma, **extra_args) -> velocity`, with x (B, C, H, W) and sigma a (B,) float32
  tensor of flow sigmas in [0, 1] (x_s = (1 - s) x0 + s noise, velocity v = noise - x0, so the
  denoised estimate is x0 = x - s v). Solvers never multiply by 1000: the pipeline's model function
  turns sigma into the transformer's timestep (`FlowSchedule.timestep_of`).
- `x` is the starting sample at `sigmas[0]`: for flow sigmas that is the noise itself (x_1 = noise).
- `sigmas` (n + 1,) non-increasing flow sigmas in [0, 1], ending in 0 (see `sanaflow.sampling.schedules`):
  a float tensor, or a sequence of numbers (made a float32 tensor). A repeated sigma is a zero-length
  step, i.e. the identity. The schedule is checked once, before the loop (one host sync if on a GPU).
- `callback({"i", "x", "sigma", "sigma_next", "denoised"})` is called once per step with the step's
  input `x`, before the update; `disable` is passed to the tqdm progress bar (None: off when not a tty).
- The return value is the sample at `sigmas[-1]` (the clean latents when it is 0).

The SANA-Sprint sampler `sample_scm` works in TrigFlow angles instead (see its docstring);
`trigflow_model_fn` turns a flow-velocity model function into the TrigFlow model function it needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import trange

from ..errors import InputError, unknown_choice
from .schedules import SCM_MAX_TIMESTEP, trigflow_to_flow_sigma

ModelFn = Callable[..., torch.Tensor]
Callback = Callable[[dict[str, Any]], None]

# SANA-Sprint's data standard deviation: TrigFlow states are scaled by it (diffusers SCMScheduler.sigma_data).
SIGMA_DATA = 0.5


def _check_schedule(values: Any, x: Any, name: str = "sigmas", upper: float = 1.0,
                    what: str = "flow sigmas") -> torch.Tensor:
    """A sampler's schedule as a 1-D float tensor, checked once: non-increasing values in [0, upper]; x a tensor.

    Sequences (lists, tuples, arrays) become float32 tensors. The value check is one reduction over the
    (n + 1,) schedule, so a schedule on the GPU costs one sync here and none inside the step loop.
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"x must be a torch.Tensor (the starting sample), got {type(x).__name__}")
    if not isinstance(values, torch.Tensor):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | np.ndarray):
            raise InputError(f"{name} must be a 1-D tensor or a sequence of {what}, got {type(values).__name__}")
        try:
            values = torch.as_tensor(np.asarray(values, dtype=np.float32))
        except (TypeError, ValueError) as e:
            raise InputError(f"{name} must be a sequence of numbers ({what}): {e}") from None
    if not values.is_floating_point() or values.ndim != 1 or len(values) < 1:
        raise InputError(
            f"{name} must be a 1-D floating-point tensor (n + 1,) of {what}; "
            f"got {values.dtype} of shape {tuple(values.shape)}"
        )
    ok = (values >= 0).all() & (values <= upper).all()  # NaN fails both
    if len(values) > 1:
        ok &= (values[1:] <= values[:-1]).all()
    if not bool(ok):
        raise InputError(
            f"{name} must be non-increasing {what} in [0, {upper:g}] (from the noise down, usually ending in 0); "
            f"got {values.tolist() if len(values) <= 12 else values}"
        )
    return values


def _sigma_batch(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Keep sigmas float32 whatever x's dtype is: the pipeline looks timesteps up by exact value.
    return sigma.to(device=x.device, dtype=torch.float32).expand(x.shape[0])  # (B,)


def _flow_lambda(s: float) -> float:
    """Half log-SNR of flow sigma s: log((1 - s) / s), +inf at s = 0 and -inf at s = 1."""
    if s <= 0.0:
        return math.inf
    if s >= 1.0:
        return -math.inf
    return math.log(1.0 - s) - math.log(s)


def _flow_prediction(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    i: int,
    extra_args: Mapping[str, Any],
    callback: Callback | None,
    need_denoised: bool = True,
) -> tuple[float, float, torch.Tensor, torch.Tensor | None]:
    """Step i of a flow sampler: (s, s_next, velocity v, data prediction x - s v), reported to `callback`.

    The data prediction is computed only when the solver needs it or a callback reports it (else None).
    """
    s, s_next = float(sigmas[i]), float(sigmas[i + 1])
    v = model_fn(x, _sigma_batch(sigmas[i], x), **extra_args)  # (B, C, H, W)
    denoised = x - s * v if need_denoised or callback is not None else None  # (B, C, H, W)
    if callback is not None:
        callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "denoised": denoised})
    return s, s_next, v, denoised


@torch.no_grad()
def sample_euler(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Flow-matching Euler: x_next = x + (s_next - s) v (diffusers' FlowMatchEulerDiscreteScheduler)."""
    sigmas = _check_schedule(sigmas, x)
    extra_args = {} if extra_args is None else extra_args
    for i in trange(len(sigmas) - 1, disable=disable):
        s, s_next, v, _ = _flow_prediction(model_fn, x, sigmas, i, extra_args, callback, need_denoised=False)
        x = x + (s_next - s) * v
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Flow DPM-Solver++(2M) multistep, step for step as diffusers' DPMSolverMultistepScheduler with flow sigmas.

    In flow terms alpha = 1 - s, lambda = log(alpha / s) and the data prediction is x0 = x - s v.
    The first step, and the last one (diffusers' `lower_order_final`: when the schedule ends in 0 or
    has fewer than 15 steps), are first order; a step to s = 0 returns x0. A step between equal sigmas
    has length 0: it is the identity and leaves the multistep history as it was.
    """
    sigmas = _check_schedule(sigmas, x)
    extra_args = {} if extra_args is None else extra_args
    n = len(sigmas) - 1
    lower_order_final = float(sigmas[-1]) == 0.0 or n < 15
    old_denoised: torch.Tensor | None = None
    h_last = math.nan
    for i in trange(n, disable=disable):
        s, s_next, _, denoised = _flow_prediction(model_fn, x, sigmas, i, extra_args, callback)  # (B, C, H, W)
        if s_next == s:
            # h = 0 (or inf - inf = NaN for two sigmas at 1.0): x stays; keeping the last real step as the
            # history keeps r = h_last / h of the next step finite (h_last = 0 would make it 0 and 0.5 / r inf)
            continue
        lam, lam_next = _flow_lambda(s), _flow_lambda(s_next)
        h = lam_next - lam
        alpha_next = 1.0 - s_next
        if s_next == 0.0:
            # exp(-h) = 0: the update collapses to the data prediction.
            x_next = denoised
        else:
            first_order = old_denoised is None or (i == n - 1 and lower_order_final)
            if first_order:
                d = denoised
            else:
                # D0 + D1 / 2 with D1 = (d - d_prev) / r, r = h_prev / h (the "midpoint" variant).
                r = h_last / h
                d = denoised + (0.5 / r) * (denoised - old_denoised)
            x_next = (s_next / s) * x - (alpha_next * math.expm1(-h)) * d
        old_denoised, h_last, x = denoised, h, x_next
    return x


def trigflow_model_fn(flow_model_fn: ModelFn, sigma_data: float = SIGMA_DATA) -> ModelFn:
    """Wrap a flow-velocity model function as the TrigFlow model function F(x, t) that `sample_scm` needs.

    The wrapped call is `flow_model_fn(x_in, s, **extra)` with s = sin t / (sin t + cos t) (B,) the
    flow sigma of the angle t and x_in = x / sigma_data * sqrt(s^2 + (1 - s)^2); SANA-Sprint feeds s
    itself as the transformer's timestep (not s x 1000). Its velocity v becomes
    F = sigma_data ((1 - 2s) x_in + (1 - 2s + 2s^2) v) / sqrt(s^2 + (1 - s)^2), as in diffusers'
    SanaSprintPipeline.
    """

    def model_fn(x: torch.Tensor, t: torch.Tensor, **extra: Any) -> torch.Tensor:
        s = trigflow_to_flow_sigma(t)  # (B,)
        s4 = s.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        norm = torch.sqrt(s4**2 + (1 - s4) ** 2)  # (B, 1, 1, 1)
        x_in = x / sigma_data * norm  # (B, C, H, W)
        v = flow_model_fn(x_in, s, **extra)  # (B, C, H, W)
        out = ((1 - 2 * s4) * x_in + (1 - 2 * s4 + 2 * s4**2) * v) / norm  # (B, C, H, W)
        return out.float() * sigma_data

    return model_fn


def _randn_like(
    x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None
) -> torch.Tensor:
    """Standard normal noise like x, drawn on the generator's device (per sample for a list), as diffusers does."""
    if isinstance(generator, Sequence):
        parts = [
            torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in generator
        ]
        return torch.cat(parts).to(x.device)  # (B, C, H, W)
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)


@torch.no_grad()
def sample_scm(
    model_fn: ModelFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    sigma_data: float = SIGMA_DATA,
) -> torch.Tensor:
    """sCM / TrigFlow few-step consistency sampler (SANA-Sprint; diffusers' SCMScheduler + SanaSprintPipeline).

    `model_fn(x, t, **extra) -> F` is a TrigFlow model function (see `trigflow_model_fn`), t (B,) the
    angles; `x` is standard normal noise (B, C, H, W); `timesteps` (n + 1,) angles ending in 0
    (`scm_timesteps`). The state starts at sigma_data x noise; each step predicts
    x0 = cos t x - sin t F and re-noises to x = cos t' x0 + sin t' sigma_data z with fresh noise z
    from `generator`. Returns the last x0 / sigma_data, i.e. latents in the VAE's scale. The callback
    gets `sigma`/`sigma_next` as angles and `denoised` in the VAE's scale. The angles must be
    non-increasing in [0, SCM_MAX_TIMESTEP] (a sequence of numbers is made a float32 tensor).
    """
    timesteps = _check_schedule(timesteps, x, "timesteps", SCM_MAX_TIMESTEP, "TrigFlow angles")
    extra_args = {} if extra_args is None else extra_args
    x = x * sigma_data
    denoised = x
    for i in trange(len(timesteps) - 1, disable=disable):
        t, t_next = timesteps[i], timesteps[i + 1]
        t_in = t.to(device=x.device, dtype=torch.float32).expand(x.shape[0])  # (B,)
        out = model_fn(x, t_in, **extra_args)  # (B, C, H, W)
        denoised = torch.cos(t) * x - torch.sin(t) * out  # (B, C, H, W)
        if callback is not None:
            callback(
                {"i": i, "x": x, "sigma": float(t), "sigma_next": float(t_next), "denoised": denoised / sigma_data}
            )
        # Noise is drawn even for the final step (sin 0 = 0), as diffusers does, so a generator shared
        # with later calls advances identically.
        noise = _randn_like(denoised, generator) * sigma_data  # (B, C, H, W)
        x = torch.cos(t_next) * denoised + torch.sin(t_next) * noise
    return denoised / sigma_data


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "dpm++2m": sample_dpmpp_2m,
    "scm": sample_scm,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """Return the sampler registered under `name`; unknown names raise a ConfigError listing the choices."""
    if name not in SAMPLERS:
        raise unknown_choice("sampler", name, SAMPLERS)
    return SAMPLERS[name]
