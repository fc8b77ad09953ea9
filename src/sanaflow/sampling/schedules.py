"""Noise schedules as pure functions: flow-matching sigmas, the flow shift, TrigFlow timesteps.

Conventions (shared by every solver in `sanaflow.sampling.solvers`):

- A *flow sigma* s in [0, 1] is the noise level of x_s = (1 - s) x0 + s noise; a schedule is a
  float32 tensor `sigmas` of shape (n + 1,), decreasing, ending in 0. Step i goes from
  `sigmas[i]` to `sigmas[i + 1]`.
- The transformer is fed a *timestep*, not a sigma. For SANA checkpoints that is what diffusers'
  scheduler hands the transformer: `FlowSchedule.timesteps` (for `DPMSolverMultistepScheduler` the
  integer part of s x 1000, for `FlowMatchEulerDiscreteScheduler` s x 1000 as a float). The pipeline's
  model function converts sigma -> timestep with `FlowSchedule.timestep_of(sigma)`; solvers and
  guidance only ever see sigmas.
- SANA-Sprint uses TrigFlow angles t in [0, pi/2] instead (see `scm_timesteps`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..utils import is_int, is_real

# Scheduler classes whose `set_timesteps` we reproduce exactly.
DPM_SCHEDULER = "DPMSolverMultistepScheduler"
EULER_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
SCM_SCHEDULER = "SCMScheduler"
SUPPORTED_SCHEDULERS = (DPM_SCHEDULER, EULER_SCHEDULER)

# SANA-Sprint defaults (diffusers' SCMScheduler / SanaSprintPipeline): the angle of pure noise is pi/2
# rounded to 5 decimals, and the 2-step schedule stops at an intermediate angle of 1.3.
SCM_MAX_TIMESTEP = 1.57080
SCM_INTERMEDIATE_TIMESTEP = 1.3

# The flow shifts the schedule builders accept. SANA's checkpoints use 1 to 6 (SANA-Sprint 3) and video
# models up to about 17, so two decades either side of 1 leave room. Outside it the schedules degenerate:
# at shift 1e-12 the first sigma is ~1e-9 (the "noise" is never denoised: the output is pure noise), and
# above ~1e4 neighbouring sigmas round to exactly 1.0 in float32 (a zero-length step at the noise end).
FLOW_SHIFT_RANGE = (1e-2, 1e2)


@dataclass(frozen=True)
class FlowSchedule:
    """A flow-matching schedule: sigmas (n + 1,) ending in 0 and the timesteps (n,) the model is fed."""

    sigmas: torch.Tensor  # (n + 1,) float32
    timesteps: torch.Tensor  # (n,) float32, the transformer's `timestep` input at step i

    @property
    def num_steps(self) -> int:
        """Number of solver steps (model evaluations for one-step-per-eval solvers)."""
        return len(self.timesteps)

    def timestep_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """Map flow sigmas (B,) to the model's timesteps (B,): the schedule's own value, else s x 1000.

        Solvers call the model exactly at `sigmas[i]`, so a lookup by equality returns the very
        timesteps diffusers feeds (the integer part of s x 1000 for DPM-Solver), which keeps parity exact.
        """
        sig = self.sigmas[:-1].to(sigma.device)  # (n,)
        match = sigma.float()[:, None] == sig[None, :]  # (B, n)
        found = match.any(dim=1)  # (B,)
        index = match.float().argmax(dim=1)  # (B,)
        table = self.timesteps.to(sigma.device)[index]  # (B,)
        return torch.where(found, table, sigma.float() * 1000.0)  # (B,)


def shift_sigmas(sigmas: torch.Tensor | np.ndarray | float, shift: float):
    """Apply the flow shift s' = shift s / (1 + (shift - 1) s) (works on tensors, arrays and floats)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def check_flow_shift(shift: object, name: str = "shift", error: type[Exception] = InputError) -> float:
    """Return `shift` as a float if it is a real number in FLOW_SHIFT_RANGE, else raise `error` naming `name`."""
    lo, hi = FLOW_SHIFT_RANGE
    if not is_real(shift) or not lo <= shift <= hi:  # NaN fails too
        raise error(f"{name} must be a number in [{lo:g}, {hi:g}] (SANA uses 1 to 6), got {shift!r}")
    return float(shift)


def check_num_train_timesteps(n: object, name: str = "num_train_timesteps", error: type[Exception] = InputError) -> int:
    """Return `n` as an int if it is an integer >= 2 (1000 for SANA), else raise `error` naming `name`.

    One training timestep would make every DPM-Solver sigma 0; integral floats (1000.0) are accepted.
    """
    whole = is_int(n) or (isinstance(n, float) and math.isfinite(n) and n.is_integer())
    if not whole or n < 2:
        raise error(f"{name} must be an integer >= 2 (SANA uses 1000), got {n!r}")
    return int(n)


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Shifted flow sigmas (n + 1,) of diffusers' DPM-Solver with `use_flow_sigmas`; starts below 1, ends in 0."""
    return _dpm_flow(num_steps, shift, num_train_timesteps).sigmas


def flow_match_euler_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Sigmas (n + 1,) of diffusers' FlowMatchEulerDiscreteScheduler(shift=...); starts at 1, ends in 0."""
    return _flow_match_euler(num_steps, shift, num_train_timesteps).sigmas


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"number of sampling steps must be an integer >= 1, got {num_steps!r}")


def _dpm_flow(num_steps: int, shift: float, num_train_timesteps: int) -> FlowSchedule:
    _check_steps(num_steps)
    shift, num_train_timesteps = check_flow_shift(shift), check_num_train_timesteps(num_train_timesteps)
    # Same float64 arithmetic, in the same order, as diffusers' set_timesteps, so the float32 sigmas
    # and the truncated integer timesteps are bit-identical.
    alphas = np.linspace(1, 1 / num_train_timesteps, num_steps + 1)  # (n + 1,)
    sigmas = 1.0 - alphas
    sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()  # (n,) drops the final 0
    timesteps = (sigmas * num_train_timesteps).astype(np.int64)  # truncated, as torch's .to(int64)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)  # (n + 1,)
    return FlowSchedule(torch.from_numpy(sigmas), torch.from_numpy(timesteps).float())


def _flow_match_euler(num_steps: int, shift: float, num_train_timesteps: int) -> FlowSchedule:
    _check_steps(num_steps)
    shift, num_train_timesteps = check_flow_shift(shift), check_num_train_timesteps(num_train_timesteps)
    # The scheduler's training sigmas are shifted once at construction (float32); set_timesteps then
    # spaces timesteps between the shifted extremes and shifts again. The double shift is diffusers'
    # behaviour and SANA's flow-euler checkpoints were sampled with it, so we reproduce it.
    train = torch.tensor([1.0 / num_train_timesteps], dtype=torch.float32)
    sigma_min = float(shift * train / (1 + (shift - 1) * train))
    sigma_max = 1.0  # shift(1) == 1 for every shift
    timesteps = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = timesteps / num_train_timesteps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas = torch.from_numpy(sigmas).to(torch.float32)  # (n,)
    timesteps = sigmas * num_train_timesteps  # (n,) float32
    return FlowSchedule(torch.cat([sigmas, torch.zeros(1)]), timesteps)


def _unsupported(config: Mapping[str, Any], key: str, allowed: Any, cls: str) -> None:
    if key in config and config[key] not in (allowed if isinstance(allowed, tuple) else (allowed,)):
        raise ConfigError(
            f"{cls} option {key}={config[key]!r} is not supported by sanaflow's flow samplers "
            f"(supported: {allowed!r})"
        )


def _config_shift(config: Mapping[str, Any], key: str) -> float:
    """The scheduler config's shift under `key` (1.0 when absent), checked: a ConfigError naming the key."""
    return check_flow_shift(config.get(key, 1.0), f"scheduler config option {key}", ConfigError)


def schedule_from_scheduler_config(
    config: Mapping[str, Any], num_steps: int, flow_shift: float | None = None
) -> FlowSchedule:
    """The exact sigmas and timesteps diffusers' scheduler (from a scheduler_config.json dict) uses for n steps.

    Supports `DPMSolverMultistepScheduler` with `use_flow_sigmas` (SANA's default) and
    `FlowMatchEulerDiscreteScheduler`; `flow_shift` overrides the config's shift. Shifts must lie in
    FLOW_SHIFT_RANGE: a bad `flow_shift` raises InputError, a bad value in the config ConfigError.
    """
    cls = config.get("_class_name", DPM_SCHEDULER)
    n_train = check_num_train_timesteps(config.get("num_train_timesteps", 1000),
                                        "scheduler config option num_train_timesteps", ConfigError)
    if flow_shift is not None:
        flow_shift = check_flow_shift(flow_shift, "flow_shift")
    if cls == DPM_SCHEDULER:
        if not config.get("use_flow_sigmas", False):
            raise ConfigError(
                f"{DPM_SCHEDULER} config without use_flow_sigmas=true is not a flow-matching schedule; "
                "sanaflow supports flow sigmas only"
            )
        _unsupported(config, "prediction_type", "flow_prediction", cls)
        _unsupported(config, "final_sigmas_type", "zero", cls)
        _unsupported(config, "algorithm_type", "dpmsolver++", cls)
        _unsupported(config, "solver_type", "midpoint", cls)
        _unsupported(config, "solver_order", 2, cls)
        _unsupported(config, "thresholding", False, cls)
        _unsupported(config, "use_dynamic_shifting", False, cls)
        _unsupported(config, "euler_at_final", False, cls)
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
            _unsupported(config, key, False, cls)
        shift = _config_shift(config, "flow_shift") if flow_shift is None else flow_shift
        return _dpm_flow(num_steps, shift, n_train)
    if cls == EULER_SCHEDULER:
        for key in ("use_dynamic_shifting", "invert_sigmas", "stochastic_sampling", "use_karras_sigmas",
                    "use_exponential_sigmas", "use_beta_sigmas"):
            _unsupported(config, key, False, cls)
        _unsupported(config, "shift_terminal", None, cls)
        shift = _config_shift(config, "shift") if flow_shift is None else flow_shift
        return _flow_match_euler(num_steps, shift, n_train)
    raise ConfigError(
        f"unsupported scheduler class {cls!r} for flow sampling; choose from: {', '.join(SUPPORTED_SCHEDULERS)}"
        + (" (SCMScheduler is sampled with sample_scm and scm_timesteps)" if cls == SCM_SCHEDULER else "")
    )


def sigmas_from_scheduler_config(
    config: Mapping[str, Any], num_steps: int, flow_shift: float | None = None
) -> torch.Tensor:
    """The exact sigma sequence (n + 1,) ending in 0 that diffusers' scheduler produces for `set_timesteps(n)`."""
    return schedule_from_scheduler_config(config, num_steps, flow_shift).sigmas


def scm_timesteps(
    num_steps: int,
    max_timestep: float = SCM_MAX_TIMESTEP,
    intermediate_timestep: float | None = SCM_INTERMEDIATE_TIMESTEP,
) -> torch.Tensor:
    """TrigFlow angles (n + 1,) ending in 0 as diffusers' SCMScheduler builds them.

    Two steps use [max, intermediate, 0] unless `intermediate_timestep` is None; other step counts
    are evenly spaced from `max_timestep` to 0 (the intermediate angle only applies to 2 steps).
    """
    _check_steps(num_steps)
    if num_steps == 2 and intermediate_timestep is not None:
        return torch.tensor([max_timestep, intermediate_timestep, 0.0]).float()
    return torch.linspace(max_timestep, 0, num_steps + 1).float()


def trigflow_to_flow_sigma(t: torch.Tensor) -> torch.Tensor:
    """Flow sigma of a TrigFlow angle: s = sin t / (sin t + cos t)."""
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))
