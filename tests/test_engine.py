"""The engine assembled once: ``build_sampler``'s pieces, plain loop, partial runs and per-step x̂₀ are those
the callers assembled by hand before (Denoiser + grid + ``make_solver`` + their own step loop), bit for bit,
and engine modules import no application."""


import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

import adjointdpm as adpm
from adjointdpm.model import Denoiser
from adjointdpm.solvers import make_solver
from conftest import SD_BETAS

SCHEDULE = adpm.VPSchedule.from_scheduler(DDIMScheduler(**SD_BETAS))
TIMESTEPS = np.array([999, 801.5, 600, 350.25, 120, 20])


def euler_scheduler():
    scheduler = EulerDiscreteScheduler(**SD_BETAS)
    scheduler.set_timesteps(5)
    return scheduler  # k-diffusion style: input_scale ≠ 1


def hand_assembled(unet, schedule, timesteps, solver, guidance_scale):
    """The grid, denoiser and solver as callers built them by hand (Session.advance/grid, the one-step baseline)."""
    if isinstance(schedule, adpm.NoiseSchedule):
        grid = adpm.TimeGrid.from_timesteps(schedule, timesteps)
    else:
        grid = adpm.grid_from_scheduler(schedule, adpm.schedule_from_scheduler(schedule), timesteps)
    den = Denoiser(unet, adpm.schedule_from_scheduler(schedule), "epsilon", guidance_scale, {})
    return grid, den, make_solver(solver, den, grid)


def assert_same_grid(a, b):
    for name in ("t", "alpha", "sigma", "lam", "rho"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert (a.alpha_end, a.sigma_end, a.t_end, a.coordinates, a.input_scale) == \
        (b.alpha_end, b.sigma_end, b.t_end, b.coordinates, b.input_scale)


@pytest.mark.parametrize("kind", ["noise_schedule", "scheduler"])
@pytest.mark.parametrize("solver", ["ddim", "dpmpp2m", "heun"])
def test_advance_and_grid_equal_the_hand_assembled_loop(unet, inputs, kind, solver):
    x, cond, uncond, _ = inputs
    schedule = SCHEDULE if kind == "noise_schedule" else euler_scheduler()
    timesteps = TIMESTEPS if kind == "noise_schedule" else schedule.timesteps.double().numpy()
    grid, _, hand = hand_assembled(unet, schedule, timesteps, solver, 3.0)
    sampler = adpm.build_sampler(unet, schedule, timesteps, solver=solver, prediction_type="epsilon",
                                 guidance_scale=3.0)
    assert_same_grid(sampler.grid, grid)
    assert_same_grid(adpm.time_grid(schedule, timesteps[2:]), hand_assembled(unet, schedule, timesteps[2:], solver, 3.0)[0])
    assert (kind == "scheduler") == (grid.input_scale != 1.0)
    for k in (0, 2, len(timesteps)):
        with torch.no_grad():
            state, hist = grid.input_scale * x, ()
            for i in range(k):
                state, hist = hand.step(i, state, hist, cond, uncond)
        got = sampler.advance(x, cond, uncond, k)
        assert torch.equal(got, state) and not got.requires_grad
    states = sampler.trajectory(x, cond, uncond)
    assert len(states) == len(timesteps) + 1 and torch.equal(states[2], sampler.advance(x, cond, uncond, 2))
    reference = adpm.sample(unet, x, schedule=schedule, timesteps=timesteps, cond=cond, uncond=uncond,
                            guidance_scale=3.0, solver=solver, grad=None, prediction_type="epsilon")
    assert torch.equal(states[-1], reference)


def test_predict_is_the_step_denoiser_and_carries_a_graph(unet, inputs):
    """The one-step baseline's x̂₀ at step i: Denoiser.eps_and_x0 at grid point i, differentiable in x and cond."""
    x, cond, uncond, _ = inputs
    grid, den, _ = hand_assembled(unet, SCHEDULE, TIMESTEPS, "dpmpp2m", 3.0)
    sampler = adpm.build_sampler(unet, SCHEDULE, TIMESTEPS, solver="dpmpp2m", guidance_scale=3.0)
    c = cond.clone().requires_grad_()
    eps, x0 = sampler.predict(3, x, c, uncond)
    eps_ref, x0_ref = den.eps_and_x0(x, grid.point(3), cond, uncond)
    assert torch.equal(eps, eps_ref) and torch.equal(x0, x0_ref)
    x0.sum().backward()
    assert c.grad is not None and c.grad.abs().sum() > 0


def test_without_guidance_uncond_is_dropped(unet, inputs):
    x, cond, uncond, _ = inputs
    sampler = adpm.build_sampler(unet, SCHEDULE, TIMESTEPS, solver="ddim")
    assert sampler.guided(uncond) is None
    assert torch.equal(sampler.advance(x, cond, uncond), sampler.advance(x, cond, None))


def test_sample_is_build_then_sample(unet, inputs):
    x, cond, uncond, weight = inputs
    kw = dict(cond=cond, uncond=uncond, guidance_scale=3.0, solver="dpmpp2m")
    xx = x.clone().requires_grad_()
    sampler = adpm.build_sampler(unet, SCHEDULE, TIMESTEPS, grad="exact", x_T=xx, **kw)
    assert isinstance(sampler.mode, adpm.Exact) and sampler.num_steps == len(TIMESTEPS)
    (sampler.sample(xx, cond, uncond) * weight).sum().backward()
    yy = x.clone().requires_grad_()
    (adpm.sample(unet, yy, schedule=SCHEDULE, timesteps=TIMESTEPS, grad="exact", **kw) * weight).sum().backward()
    assert torch.equal(xx.grad, yy.grad)


def test_a_stochastic_sampler_needs_x_T(unet):
    with pytest.raises(ValueError, match="x_T"):
        adpm.build_sampler(unet, SCHEDULE, TIMESTEPS, solver="ddpm")
    with pytest.raises(ValueError, match="eta > 0"):
        adpm.build_sampler(unet, SCHEDULE, TIMESTEPS, solver="ddim", eta=0.5)


def test_steps_set_on_a_copy_of_the_scheduler():
    scheduler = DDIMScheduler(**SD_BETAS)
    grid = adpm.time_grid(scheduler, steps=4)
    assert len(grid) == 4 and scheduler.num_inference_steps is None
