"""Flow-matching sampling: schedules, solvers (one k-diffusion-style contract) and guidance wrappers.

Typical use by a pipeline::

    sched = schedule_from_scheduler_config(scheduler_config, steps)      # exact diffusers sigmas
    def model_fn(x, sigma, encoder_hidden_states, encoder_attention_mask):
        t = sched.timestep_of(sigma)                                       # (B,) diffusers' timesteps
        return transformer(x, encoder_hidden_states, t, encoder_attention_mask=encoder_attention_mask)
    guided = cfg(model_fn, 4.5)
    latents = get_sampler("dpm++2m")(guided, noise, sched.sigmas,
                                     extra_args={"cond": {...}, "uncond": {...}})
"""

from .guidance import PERTURBED_KEY, cfg, guided_model, pag
from .schedules import (
    FLOW_SHIFT_RANGE,
    SCM_INTERMEDIATE_TIMESTEP,
    SCM_MAX_TIMESTEP,
    FlowSchedule,
    flow_match_euler_sigmas,
    flow_sigmas,
    schedule_from_scheduler_config,
    scm_timesteps,
    shift_sigmas,
    sigmas_from_scheduler_config,
    trigflow_to_flow_sigma,
)
from .solvers import (
    SAMPLERS,
    SIGMA_DATA,
    get_sampler,
    sample_dpmpp_2m,
    sample_euler,
    sample_scm,
    trigflow_model_fn,
)

__all__ = [
    "FLOW_SHIFT_RANGE",
    "PERTURBED_KEY",
    "SAMPLERS",
    "SCM_INTERMEDIATE_TIMESTEP",
    "SCM_MAX_TIMESTEP",
    "SIGMA_DATA",
    "FlowSchedule",
    "cfg",
    "flow_match_euler_sigmas",
    "flow_sigmas",
    "get_sampler",
    "guided_model",
    "pag",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_scm",
    "schedule_from_scheduler_config",
    "scm_timesteps",
    "shift_sigmas",
    "sigmas_from_scheduler_config",
    "trigflow_model_fn",
    "trigflow_to_flow_sigma",
]
