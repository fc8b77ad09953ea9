"""Samplers, schedules and guidance against their formulas and against diffusers' schedulers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SCMScheduler

from sanaflow.errors import SanaflowError
from sanaflow.sampling import (
    SAMPLERS,
    cfg,
    flow_match_euler_sigmas,
    flow_sigmas,
    get_sampler,
    guided_model,
    pag,
    sample_dpmpp_2m,
    sample_euler,
    sample_scm,
    schedule_from_scheduler_config,
    scm_timesteps,
    shift_sigmas,
    sigmas_from_scheduler_config,
    trigflow_model_fn,
)

# scheduler_config.json of the SANA diffusers checkpoints (1024px: shift 3; 4K: shift 6) and of a flow-euler export.
SANA_DPM_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lambda_min_clipped": -float("inf"),
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}
SANA_4K_DPM_CONFIG = {**SANA_DPM_CONFIG, "flow_shift": 6.0}
SANA_EULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

SHIFTS = [1.0, 3.0, 6.0]
STEPS = [1, 2, 5, 20]


def toy_velocity(x: torch.Tensor, sigma: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """A fixed, mildly nonlinear velocity field: channel mixing of x modulated by sigma, plus a sigma bias."""
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(x.shape[1], x.shape[1], generator=g) * 0.3  # (C, C)
    bias = torch.randn(1, x.shape[1], 1, 1, generator=g)  # (1, C, 1, 1)
    s = sigma.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    mixed = torch.einsum("dc,bchw->bdhw", w, x)  # (B, C, H, W)
    return scale * (mixed * (1 + s) + torch.tanh(x) * (1 - s) + bias * s)


def noise(seed: int = 0, shape=(2, 4, 6, 6)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- schedules


def test_shift_formula():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    out = shift_sigmas(s, 3.0)
    assert torch.allclose(out, 3 * s / (1 + 2 * s))
    assert out[0] == 0 and out[-1] == 1
    assert torch.equal(shift_sigmas(s, 1.0), s)


@pytest.mark.parametrize("config", [SANA_DPM_CONFIG, SANA_4K_DPM_CONFIG], ids=["shift3", "shift6"])
@pytest.mark.parametrize("steps", [1, 2, 14, 20, 50])
def test_dpm_sigmas_and_timesteps_equal_diffusers(config, steps):
    ref = DPMSolverMultistepScheduler.from_config(config)
    ref.set_timesteps(steps)
    sched = schedule_from_scheduler_config(config, steps)
    assert torch.equal(sched.sigmas, ref.sigmas)
    assert torch.equal(sched.timesteps, ref.timesteps.float())
    assert torch.equal(sigmas_from_scheduler_config(config, steps), ref.sigmas)
    assert torch.equal(flow_sigmas(steps, config["flow_shift"]), ref.sigmas)
    # the model is fed diffusers' truncated integer timesteps, looked up from the sigmas the solver passes
    for i in range(steps):
        sigma = sched.sigmas[i].expand(3)
        assert torch.equal(sched.timestep_of(sigma), ref.timesteps[i].float().expand(3))


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("steps", STEPS)
def test_flow_match_euler_sigmas_equal_diffusers(shift, steps):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    sched = schedule_from_scheduler_config({**SANA_EULER_CONFIG, "shift": shift}, steps)
    assert torch.equal(sched.sigmas, ref.sigmas)
    assert torch.equal(sched.timesteps, ref.timesteps)
    assert torch.equal(flow_match_euler_sigmas(steps, shift), ref.sigmas)


def test_flow_shift_override_and_unsupported_configs():
    a = schedule_from_scheduler_config(SANA_DPM_CONFIG, 10, flow_shift=6.0)
    assert torch.equal(a.sigmas, flow_sigmas(10, 6.0))
    with pytest.raises(SanaflowError, match="use_flow_sigmas"):
        schedule_from_scheduler_config({**SANA_DPM_CONFIG, "use_flow_sigmas": False}, 10)
    with pytest.raises(SanaflowError, match="use_karras_sigmas"):
        schedule_from_scheduler_config({**SANA_DPM_CONFIG, "use_karras_sigmas": True}, 10)
    with pytest.raises(SanaflowError, match="DPMSolverMultistepScheduler"):
        schedule_from_scheduler_config({"_class_name": "DDIMScheduler"}, 10)
    with pytest.raises(SanaflowError, match="steps"):
        flow_sigmas(0, 3.0)


def test_scm_timesteps_equal_diffusers():
    ref = SCMScheduler()
    ref.set_timesteps(2)
    assert torch.equal(scm_timesteps(2), ref.timesteps)
    for n in (1, 3, 4):
        ref.set_timesteps(n, intermediate_timesteps=None)
        assert torch.equal(scm_timesteps(n), ref.timesteps)
    ref.set_timesteps(2, intermediate_timesteps=None)
    assert torch.equal(scm_timesteps(2, intermediate_timestep=None), ref.timesteps)


# ---------------------------------------------------------------- solvers vs formulas


def _trajectory(sampler, sigmas, x):
    steps = []
    out = sampler(lambda x, s: toy_velocity(x, s), x, sigmas, callback=steps.append, disable=True)
    return steps, out


@pytest.mark.parametrize("shift", SHIFTS)
def test_euler_matches_formula_step_by_step(shift):
    sigmas = flow_match_euler_sigmas(7, shift)
    steps, out = _trajectory(sample_euler, sigmas, noise())
    xs = [st["x"] for st in steps] + [out]
    for i, st in enumerate(steps):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        v = toy_velocity(st["x"], sigmas[i].expand(2))
        assert st["sigma"] == s and st["i"] == i
        assert torch.allclose(st["denoised"], st["x"] - s * v, atol=1e-6)
        assert torch.allclose(xs[i + 1], st["x"] + (s_next - s) * v, atol=1e-6)


@pytest.mark.parametrize("shift", SHIFTS)
def test_dpmpp_2m_matches_formula_step_by_step(shift):
    n = 8
    sigmas = flow_sigmas(n, shift)
    steps, out = _trajectory(sample_dpmpp_2m, sigmas, noise())
    xs = [st["x"] for st in steps] + [out]

    def lam(s):  # half log-SNR of a flow sigma: alpha = 1 - s
        return math.log((1 - s) / s)

    prev_d = None
    for i, st in enumerate(steps):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = st["x"] - s * toy_velocity(st["x"], sigmas[i].expand(2))  # x0 = x - s v
        assert torch.allclose(st["denoised"], d, atol=1e-6)
        if s_next == 0:
            expected = d  # last step to sigma 0 lands on the data prediction
        else:
            h = lam(s_next) - lam(s)
            if prev_d is None or i == n - 1:
                big_d = d
            else:
                r = (lam(s) - lam(float(sigmas[i - 1]))) / h
                big_d = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * prev_d
            expected = (s_next / s) * st["x"] + (1 - s_next) * (1 - math.exp(-h)) * big_d
        assert torch.allclose(xs[i + 1], expected, atol=1e-5), i
        prev_d = d


# ---------------------------------------------------------------- solvers vs diffusers


def _diffusers_loop(scheduler, x, steps):
    scheduler.set_timesteps(steps)
    traj = []
    for i, t in enumerate(scheduler.timesteps):
        traj.append(x)
        v = toy_velocity(x, scheduler.sigmas[i].expand(x.shape[0]))
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return traj, x


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("steps", STEPS)
def test_dpmpp_2m_matches_diffusers(shift, steps):
    ref = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift, solver_order=2,
        algorithm_type="dpmsolver++", lower_order_final=True, final_sigmas_type="zero",
    )
    x = noise()
    ref_traj, ref_out = _diffusers_loop(ref, x, steps)
    traj, out = _trajectory(sample_dpmpp_2m, flow_sigmas(steps, shift), x)
    for ours, theirs in zip([st["x"] for st in traj], ref_traj):
        assert (ours - theirs).abs().max() <= 1e-5
    assert (out - ref_out).abs().max() <= 1e-5


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("steps", STEPS)
def test_euler_matches_diffusers(shift, steps):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    x = noise()
    ref_traj, ref_out = _diffusers_loop(ref, x, steps)
    traj, out = _trajectory(sample_euler, flow_match_euler_sigmas(steps, shift), x)
    for ours, theirs in zip([st["x"] for st in traj], ref_traj):
        assert (ours - theirs).abs().max() <= 1e-5
    assert (out - ref_out).abs().max() <= 1e-5


def test_dpmpp_2m_on_euler_schedule_starting_at_one_is_finite():
    # sigma 1 (lambda = -inf) is allowed: the first step is then exact for x = noise
    out = sample_dpmpp_2m(lambda x, s: toy_velocity(x, s), noise(), flow_match_euler_sigmas(4, 3.0), disable=True)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_scm_matches_diffusers_sprint_loop(steps):
    sigma_data = 0.5
    flow_fn = lambda x, s: toy_velocity(x, s, scale=0.5)  # noqa: E731
    x = noise()
    timesteps = scm_timesteps(steps)

    # diffusers: SanaSprintPipeline's loop around SCMScheduler.step, with the pipeline's conversions
    ref = SCMScheduler(sigma_data=sigma_data)
    ref.set_timesteps(steps, intermediate_timesteps=1.3 if steps == 2 else None)
    ref.set_begin_index(0)
    gen = torch.Generator().manual_seed(7)
    latents = x * sigma_data
    for t in ref.timesteps[:-1]:
        t_b = t.expand(latents.shape[0])
        s = (torch.sin(t_b) / (torch.cos(t_b) + torch.sin(t_b))).view(-1, 1, 1, 1)
        x_in = latents / sigma_data * torch.sqrt(s**2 + (1 - s) ** 2)
        v = flow_fn(x_in, s.flatten())
        f = ((1 - 2 * s) * x_in + (1 - 2 * s + 2 * s**2) * v) / torch.sqrt(s**2 + (1 - s) ** 2)
        latents, denoised = ref.step(f.float() * sigma_data, t_b, latents, generator=gen, return_dict=False)
    expected = denoised / sigma_data

    out = sample_scm(
        trigflow_model_fn(flow_fn), x, timesteps, generator=torch.Generator().manual_seed(7), disable=True
    )
    assert (out - expected).abs().max() <= 1e-5


# ---------------------------------------------------------------- guidance


def _cond(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return {"emb": torch.randn(batch, 4, generator=g), "mask": torch.ones(batch, 3), "tag": "same"}


def conditioned_model(calls):
    def model_fn(x, sigma, emb, mask, tag, perturbed=None):
        calls.append(x.shape[0])
        assert tag == "same" and mask.shape[0] == x.shape[0] and sigma.shape == (x.shape[0],)
        v = toy_velocity(x, sigma) + emb.mean(dim=1).view(-1, 1, 1, 1)
        if perturbed is not None:
            v = torch.where(perturbed.view(-1, 1, 1, 1), 0.5 * v - 0.1, v)
        return v

    return model_fn


def test_cfg_equals_manual_two_calls_in_one_batched_call():
    calls = []
    model = conditioned_model(calls)
    x, sigma = noise(), torch.full((2,), 0.7)
    cond, uncond = _cond(2, 1), _cond(2, 2)
    out = cfg(model, 4.5)(x, sigma, cond=cond, uncond=uncond)
    assert calls == [4]  # one call on the doubled batch
    v_c, v_u = model(x, sigma, **cond), model(x, sigma, **uncond)
    assert torch.allclose(out, v_u + 4.5 * (v_c - v_u), atol=1e-5)
    calls.clear()
    assert torch.equal(cfg(model, 1.0)(x, sigma, cond=cond, uncond=uncond), model(x, sigma, **cond))
    assert calls[0] == 2
    with pytest.raises(SanaflowError, match="uncond"):
        cfg(model, 3.0)(x, sigma, cond=cond)


def test_pag_scale_zero_equals_cfg_exactly():
    model = conditioned_model([])
    x, sigma = noise(), torch.full((2,), 0.4)
    cond, uncond = _cond(2, 1), _cond(2, 2)
    for scale in (1.0, 4.5):
        a = pag(model, scale, 0.0)(x, sigma, cond=cond, uncond=uncond)
        b = cfg(model, scale)(x, sigma, cond=cond, uncond=uncond)
        assert torch.equal(a, b)
    # and inside a whole sampling run
    sig = flow_sigmas(5, 3.0)
    extra = {"cond": cond, "uncond": uncond}
    a = sample_dpmpp_2m(pag(model, 4.5, 0.0), x, sig, extra_args=extra, disable=True)
    b = sample_dpmpp_2m(cfg(model, 4.5), x, sig, extra_args=extra, disable=True)
    assert torch.equal(a, b)


def test_pag_combines_three_branches_in_one_call():
    calls = []
    model = conditioned_model(calls)
    x, sigma = noise(), torch.full((2,), 0.4)
    cond, uncond = _cond(2, 1), _cond(2, 2)
    out = pag(model, 4.5, 2.0)(x, sigma, cond=cond, uncond=uncond)
    assert calls == [6]
    v_u, v_c = model(x, sigma, **uncond), model(x, sigma, **cond)
    v_p = model(x, sigma, **cond, perturbed=torch.ones(2, dtype=torch.bool))
    assert not torch.allclose(v_p, v_c)
    assert torch.allclose(out, v_u + 4.5 * (v_c - v_u) + 2.0 * (v_c - v_p), atol=1e-5)
    # without CFG (scale <= 1) diffusers' SanaPAGPipeline batches [cond, perturbed]
    calls.clear()
    out = pag(model, 1.0, 2.0)(x, sigma, cond=cond)
    assert calls == [4]
    assert torch.allclose(out, v_c + 2.0 * (v_c - v_p), atol=1e-5)


def test_pag_with_separate_perturbed_fn_and_guided_model():
    calls = []
    model = conditioned_model(calls)

    def perturbed_fn(x, sigma, **cond):  # e.g. identity processors swapped in for the whole call
        return model(x, sigma, **cond, perturbed=torch.ones(x.shape[0], dtype=torch.bool))

    x, sigma = noise(), torch.full((2,), 0.4)
    cond, uncond = _cond(2, 1), _cond(2, 2)
    one_call = pag(model, 4.5, 2.0)(x, sigma, cond=cond, uncond=uncond)
    calls.clear()
    two_calls = pag(model, 4.5, 2.0, perturbed_fn=perturbed_fn)(x, sigma, cond=cond, uncond=uncond)
    assert calls == [4, 2]
    assert torch.allclose(one_call, two_calls, atol=1e-5)
    no_cfg = pag(model, 1.0, 2.0, perturbed_fn=perturbed_fn)(x, sigma, cond=cond)
    assert torch.allclose(no_cfg, pag(model, 1.0, 2.0)(x, sigma, cond=cond), atol=1e-5)

    # guided_model: CFG only above 1 (as diffusers), PAG only above 0, extra_args built for the sampler
    fn, extra = guided_model(model, cond, uncond, guidance_scale=4.5)
    assert set(extra) == {"cond", "uncond"}
    assert torch.equal(fn(x, sigma, **extra), cfg(model, 4.5)(x, sigma, cond=cond, uncond=uncond))
    fn, extra = guided_model(model, cond, uncond, guidance_scale=0.5)
    assert set(extra) == {"cond"} and torch.equal(fn(x, sigma, **extra), model(x, sigma, **cond).float())
    fn, extra = guided_model(model, cond, uncond, guidance_scale=4.5, pag_scale=2.0)
    assert torch.equal(fn(x, sigma, **extra), one_call)
    with pytest.raises(SanaflowError, match="negative"):
        guided_model(model, cond, None, guidance_scale=4.5)


# ---------------------------------------------------------------- registry, determinism


def test_unknown_sampler_names_choices():
    with pytest.raises(SanaflowError) as err:
        get_sampler("dpm2m")
    msg = str(err.value)
    assert "dpm2m" in msg and all(name in msg for name in SAMPLERS)
    assert get_sampler("euler") is sample_euler
    assert set(SAMPLERS) == {"euler", "dpm++2m", "scm"}


@pytest.mark.parametrize("name", ["euler", "dpm++2m"])
def test_seed_gives_identical_output(name):
    def run():
        x = torch.randn((1, 4, 6, 6), generator=torch.Generator().manual_seed(42))
        return get_sampler(name)(lambda x, s: toy_velocity(x, s), x, flow_sigmas(6, 3.0), disable=True)

    assert torch.equal(run(), run())


def test_scm_seed_gives_identical_output_and_seeds_differ():
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((1, 4, 6, 6), generator=g)
        return sample_scm(trigflow_model_fn(lambda x, s: toy_velocity(x, s)), x, scm_timesteps(3), generator=g,
                          disable=True)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


# ---------------------------------------------------------------- the pipeline contract on a real transformer


@pytest.mark.parametrize("sampler, steps", [("dpm++2m", 2), ("dpm++2m", 6), ("euler", 3)])
def test_contract_reproduces_sana_pipeline_denoise_loop(sampler, steps):
    """timestep_of + cfg + solver == SanaPipeline's loop (transformer fed diffusers' timesteps, CFG batch)."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        sample_size=4,
    ).eval()
    conf = SANA_DPM_CONFIG if sampler == "dpm++2m" else SANA_EULER_CONFIG
    emb, neg = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    mask, neg_mask = torch.ones(2, 5), torch.ones(2, 5)
    mask[1, 3:] = 0
    x = noise(3, (2, 4, 4, 4))

    ref = (DPMSolverMultistepScheduler if sampler == "dpm++2m" else FlowMatchEulerDiscreteScheduler).from_config(conf)
    ref.set_timesteps(steps)
    latents = x
    with torch.no_grad():
        for t in ref.timesteps:
            v = model(torch.cat([latents] * 2), encoder_hidden_states=torch.cat([neg, emb]),
                      encoder_attention_mask=torch.cat([neg_mask, mask]), timestep=t.expand(4) * 1.0,
                      return_dict=False)[0].float()
            v_u, v_c = v.chunk(2)
            latents = ref.step(v_u + 4.5 * (v_c - v_u), t, latents, return_dict=False)[0]

    sched = schedule_from_scheduler_config(conf, steps)
    seen = []

    def model_fn(x, sigma, encoder_hidden_states, encoder_attention_mask):
        t = sched.timestep_of(sigma)
        seen.append(t)
        return model(x, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                     timestep=t, return_dict=False)[0]

    out = get_sampler(sampler)(
        cfg(model_fn, 4.5), x, sched.sigmas, disable=True,
        extra_args={"cond": {"encoder_hidden_states": emb, "encoder_attention_mask": mask},
                    "uncond": {"encoder_hidden_states": neg, "encoder_attention_mask": neg_mask}},
    )
    assert torch.equal(torch.stack([t[0] for t in seen]), ref.timesteps.float())
    assert (out - latents).abs().max() <= 1e-5
