"""Input checks of the DC-AE (encode / decode / tiling options) and of the sampling schedules and solvers.

Every bad input raises a SanaflowError (InputError / ConfigError) that says what is wrong and what is
allowed; the valid edge cases (an empty batch, sequences as sigmas, repeated sigmas) give correct results.
All on the CPU with the embedded tiny VAE (f = 16, 16 latent channels) and toy model functions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import sanaflow
from sanaflow import sampling
from sanaflow.errors import ConfigError, InputError
from sanaflow.models.dc_ae import DCAE

VAE_DIR = Path(sanaflow.__file__).parent / "assets" / "shapes-tiny" / "vae"
DPM_CONFIG = {"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 3.0,
              "num_train_timesteps": 1000}
EULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000}


@pytest.fixture(scope="module")
def vae():
    return DCAE.from_pretrained(VAE_DIR).eval()


@pytest.fixture(scope="module")
def latents(vae):
    return torch.randn(1, vae.config.latent_channels, 4, 4)


# ---------------------------------------------------------------- DC-AE: tensors


@pytest.mark.parametrize("tiling", [False, True])
def test_empty_batch_gives_empty_results(vae, tiling):
    f, c = vae.spatial_compression_ratio, vae.config.latent_channels
    with torch.no_grad():
        z = vae.encode(torch.rand(0, 3, 64, 64), tiling=tiling)
        x = vae.decode(torch.randn(0, c, 4, 4), tiling=tiling)
        z_t = vae.tiled_encode(torch.rand(0, 3, 64, 64))
        x_t = vae.tiled_decode(torch.randn(0, c, 4, 4))
    assert z.shape == z_t.shape == (0, c, 64 // f, 64 // f) and z.dtype == vae.dtype
    assert x.shape == x_t.shape == (0, 3, 4 * f, 4 * f) and x.dtype == vae.dtype


def test_zero_sized_sides_are_refused(vae):
    c = vae.config.latent_channels
    with pytest.raises(InputError, match="positive multiples of the compression ratio 16; got 0x64"):
        vae.encode(torch.rand(1, 3, 0, 64))
    with pytest.raises(InputError, match="positive multiples"):
        vae.tiled_encode(torch.rand(1, 3, 64, 0))
    with pytest.raises(InputError, match=r"latent sides must be positive .*got 0x4"):
        vae.decode(torch.randn(1, c, 0, 4))
    with pytest.raises(InputError, match="latent sides must be positive"):
        vae.tiled_decode(torch.randn(1, c, 4, 0))


@pytest.mark.parametrize("bad", [np.zeros((1, 3, 64, 64), dtype=np.float32), [[[[0.0] * 64] * 64] * 3]])
def test_non_tensor_inputs_are_refused(vae, bad):
    with pytest.raises(InputError, match="images must be a torch.Tensor"):
        vae.encode(bad)
    with pytest.raises(InputError, match="latents must be a torch.Tensor"):
        vae.decode(bad)
    with pytest.raises(InputError, match="latents must be a torch.Tensor"):
        vae.tiled_decode(bad)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.int64, torch.complex64])
def test_non_floating_dtypes_are_refused(vae, dtype):
    c = vae.config.latent_channels
    with pytest.raises(InputError, match=r"images must be a floating-point tensor .*\[-1, 1\]"):
        vae.encode(torch.zeros(1, 3, 64, 64, dtype=dtype))
    with pytest.raises(InputError, match="latents must be a floating-point tensor"):
        vae.decode(torch.zeros(1, c, 4, 4, dtype=dtype))


def test_other_float_dtypes_still_work(vae, latents):
    with torch.no_grad():
        ref = vae.decode(latents)
        out = vae.decode(latents.double())  # cast to the weights' dtype, as before
    assert torch.equal(out, ref)


# ---------------------------------------------------------------- DC-AE: tiling options


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(tile="32"), "tile must be an int"),
        (dict(tile=32.0), "tile must be an int"),
        (dict(tile=True), "tile must be an int"),
        (dict(overlap="0"), "overlap must be an int"),
        (dict(tile_batch=1.5), "tile_batch must be an int"),
        (dict(tile_batch="2"), "tile_batch must be an int"),
        (dict(tile=-5), r"tile \(-5\) must be positive"),
        (dict(tile=0), r"tile \(0\) must be positive and overlap \(None\) non-negative multiples of 16"),
        (dict(overlap=-16), "non-negative multiples of 16"),
        (dict(tile_batch=-1), "tile_batch must be an int >= 1"),
        (dict(tile_batch=0), "tile_batch must be an int >= 1"),
    ],
)
@pytest.mark.parametrize("tiling", ["auto", False, True])
def test_bad_tile_options_are_refused_whether_or_not_tiling_runs(vae, latents, options, match, tiling):
    with pytest.raises(InputError, match=match):
        vae.decode(latents, tiling=tiling, **options)
    with pytest.raises(InputError, match=match):
        vae.encode(torch.rand(1, 3, 64, 64), tiling=tiling, **options)


def test_tile_too_small_for_the_receptive_field_is_refused_up_front(vae, latents):
    with pytest.raises(InputError, match="use a larger tile"):
        vae.decode(latents, tile=32)  # 64 px: auto does not tile, the option is still checked


@pytest.mark.parametrize("chunk", [0, -5, 2.5, "8"])
def test_bad_chunk_is_refused(vae, latents, chunk):
    with pytest.raises(InputError, match="chunk must be an int"):
        vae.tiled_decode(latents, tile=336, chunk=chunk)
    with pytest.raises(InputError, match="chunk must be an int"):
        vae.tiled_encode(torch.rand(1, 3, 64, 64), tile=336, chunk=chunk)


def test_good_tile_options_keep_the_result(vae, latents):
    with torch.no_grad():
        ref = vae.decode(latents, tiling=False)
        assert torch.equal(vae.decode(latents, tiling=False, tile=336, tile_batch=2), ref)  # unused: no effect
        tiled = vae.tiled_decode(latents, tile=np.int64(336), tile_batch=1, chunk=None)
        assert torch.equal(vae.tiled_decode(latents, tile=336, tile_batch=1, chunk=8192), tiled)
    assert tiled.shape == ref.shape and (tiled - ref).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("shift", [float("nan"), float("inf"), 0, 0.0, -1, -2.0, 1e-12, 1e-3, 1e8, True, "3"])
def test_bad_shifts_are_refused(shift):
    lo, hi = sampling.FLOW_SHIFT_RANGE
    for build in (sampling.flow_sigmas, sampling.flow_match_euler_sigmas):
        with pytest.raises(InputError, match=rf"shift must be a number in \[{lo:g}, {hi:g}\]"):
            build(2, shift=shift)
    for conf in (DPM_CONFIG, EULER_CONFIG):
        with pytest.raises(InputError, match="flow_shift must be a number in"):
            sampling.schedule_from_scheduler_config(conf, 2, shift)


@pytest.mark.parametrize("shift", [*sampling.FLOW_SHIFT_RANGE, np.float64(3.0), 6])
def test_shifts_in_range_give_valid_schedules(shift):
    for sched in (sampling.schedule_from_scheduler_config(DPM_CONFIG, 20, shift),
                  sampling.schedule_from_scheduler_config(EULER_CONFIG, 20, shift)):
        s, t = sched.sigmas, sched.timesteps
        assert torch.isfinite(s).all() and (s[1:] < s[:-1]).all() and s[0] <= 1 and s[-1] == 0
        assert (t >= 0).all() and (t <= 1000).all()  # within the training range


def test_in_range_shift_values_keep_the_schedule():
    assert torch.equal(sampling.flow_sigmas(10, 3), sampling.flow_sigmas(10, 3.0))
    assert torch.equal(sampling.schedule_from_scheduler_config(DPM_CONFIG, 10).sigmas, sampling.flow_sigmas(10, 3.0))
    legacy = sampling.schedule_from_scheduler_config({**DPM_CONFIG, "num_train_timesteps": 1000.0}, 10)
    assert torch.equal(legacy.sigmas, sampling.flow_sigmas(10, 3.0))


@pytest.mark.parametrize("n_train", [0, 1, -3, 2.5, "x", None, True])
def test_bad_num_train_timesteps(n_train):
    with pytest.raises(InputError, match="num_train_timesteps must be an integer >= 2"):
        sampling.flow_sigmas(2, num_train_timesteps=n_train)
    with pytest.raises(InputError, match="num_train_timesteps must be an integer >= 2"):
        sampling.flow_match_euler_sigmas(2, num_train_timesteps=n_train)
    with pytest.raises(ConfigError, match="scheduler config option num_train_timesteps must be an integer"):
        sampling.schedule_from_scheduler_config({**DPM_CONFIG, "num_train_timesteps": n_train}, 2)


@pytest.mark.parametrize("conf, key", [(DPM_CONFIG, "flow_shift"), (EULER_CONFIG, "shift")])
@pytest.mark.parametrize("value", ["x", None, 0.0, float("nan"), 1e6])
def test_bad_shift_in_the_scheduler_config(conf, key, value):
    with pytest.raises(ConfigError, match=f"scheduler config option {key} must be a number in"):
        sampling.schedule_from_scheduler_config({**conf, key: value}, 2)
    # an explicit in-range flow_shift overrides the config's value
    assert sampling.schedule_from_scheduler_config({**conf, key: value}, 2, 3.0).num_steps == 2


def test_embedded_model_schedule_refuses_huge_and_tiny_flow_shift():
    """The call the pipeline makes (`TextToImagePipeline._sample`), on the embedded model's scheduler config.

    Loading the whole pipeline takes most of this file's time budget, so the config is read directly;
    `pipe(..., flow_shift=1e8)` surfaces this very InputError.
    """
    conf = json.loads((VAE_DIR.parent / "scheduler" / "scheduler_config.json").read_text())
    for shift in (1e8, 1e-12):
        with pytest.raises(InputError, match=r"flow_shift must be a number in \[0.01, 100\]"):
            sampling.schedule_from_scheduler_config(conf, 2, shift)
    assert torch.equal(sampling.schedule_from_scheduler_config(conf, 2, None).sigmas, sampling.flow_sigmas(2, 1.0))


# ---------------------------------------------------------------- solvers


def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A toy flow velocity field (B, C, H, W), depending on sigma (B,)."""
    return 0.5 * x + sigma.view(-1, 1, 1, 1)


@pytest.mark.parametrize("sampler", [sampling.sample_euler, sampling.sample_dpmpp_2m])
def test_sequences_are_accepted_as_sigmas(sampler):
    x = torch.randn(2, 3, 4, 4)
    ref = sampler(velocity, x, torch.tensor([1.0, 0.5, 0.0]), disable=True)
    for seq in ([1.0, 0.5, 0.0], (1, 0.5, 0), np.array([1.0, 0.5, 0.0])):
        assert torch.equal(sampler(velocity, x, seq, disable=True), ref)


@pytest.mark.parametrize("sampler", [sampling.sample_euler, sampling.sample_dpmpp_2m])
@pytest.mark.parametrize(
    "sigmas, match",
    [
        ([0.0, 1.0], "non-increasing flow sigmas in \\[0, 1\\]"),
        ([1.0, 0.2, 0.5, 0.0], "non-increasing"),
        ([2.0, 0.0], "non-increasing"),
        ([1.0, -0.1], "non-increasing"),
        ([float("nan"), 0.0], "non-increasing"),
        ("1, 0", "sequence of flow sigmas"),
        (1.0, "sequence of flow sigmas"),
        ([1.0, "a"], "sequence of numbers"),
        (torch.zeros(2, 2), "1-D floating-point tensor"),
        (torch.tensor([1, 0]), "1-D floating-point tensor"),
    ],
)
def test_bad_sigmas_are_refused(sampler, sigmas, match):
    with pytest.raises(InputError, match=match):
        sampler(velocity, torch.randn(1, 2, 2, 2), sigmas, disable=True)


def test_dpmpp_2m_zero_length_steps_are_the_identity():
    x = torch.randn(2, 3, 4, 4)
    # two sigmas at 1.0 (what a huge shift rounds to in float32) used to give NaN
    out = sampling.sample_dpmpp_2m(velocity, x, [1.0, 1.0, 0.0], disable=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out, sampling.sample_dpmpp_2m(velocity, x, [1.0, 0.0], disable=True))
    # a repeated sigma inside the schedule: skipped, the multistep history is kept
    sig = sampling.flow_sigmas(6, 3.0).tolist()
    repeated = sig[:3] + [sig[2]] + sig[3:]
    a = sampling.sample_dpmpp_2m(velocity, x, repeated, disable=True)
    b = sampling.sample_dpmpp_2m(velocity, x, sig, disable=True)
    assert torch.isfinite(a).all() and (a - b).abs().max().item() <= 1e-6


def test_euler_zero_length_step_is_the_identity():
    x = torch.randn(2, 3, 4, 4)
    a = sampling.sample_euler(velocity, x, [1.0, 1.0, 0.5, 0.0], disable=True)
    assert torch.equal(a, sampling.sample_euler(velocity, x, [1.0, 0.5, 0.0], disable=True))


def test_scm_timesteps_are_checked():
    x = torch.randn(1, 2, 2, 2)
    fn = lambda x, t: 0.1 * x  # noqa: E731
    ref = sampling.sample_scm(fn, x, sampling.scm_timesteps(2), disable=True, generator=torch.Generator().manual_seed(0))
    seq = [sampling.SCM_MAX_TIMESTEP, sampling.SCM_INTERMEDIATE_TIMESTEP, 0.0]
    out = sampling.sample_scm(fn, x, seq, disable=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, ref)
    for bad in ([0.0, 1.3], [3.0, 0.0], [math.nan, 0.0]):
        with pytest.raises(InputError, match="non-increasing TrigFlow angles"):
            sampling.sample_scm(fn, x, bad, disable=True)


def test_solver_x_must_be_a_tensor():
    with pytest.raises(InputError, match="x must be a torch.Tensor"):
        sampling.sample_euler(velocity, np.zeros((1, 2, 2, 2)), [1.0, 0.0], disable=True)
