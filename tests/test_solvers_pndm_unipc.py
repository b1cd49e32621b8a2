"""PNDM (PLMS, skip_prk_steps or the Runge–Kutta warm-up) and UniPC under their contracts: the forward pass is
the diffusers scheduler's own loop on its own grid (``scheduler.timesteps`` passed as it is, no ``solver=``: the
engine recognises the class) to ≤ 1e-5 under guidance 3, and the exact gradient is float64 back-propagation."""

import pytest
import torch
from diffusers import PNDMScheduler, UniPCMultistepScheduler

import adjointdpm as adpm
from _contracts import SolverContract, pytest_generate_tests, unet_problem  # noqa: F401 (parametrises the contracts)
from conftest import SD_BETAS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

GUIDANCE = 3.0
#: SD 1.5's scheduler config (steps_offset 1, set_alpha_to_one False, scaled_linear betas)
SD15 = dict(SD_BETAS, steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True)


def diffusers_loop(unet, scheduler, x, cond, uncond):
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.expand_as(cond), cond])).sample
            out_u, out_c = out.chunk(2)
            x = scheduler.step(out_u + GUIDANCE * (out_c - out_u), t, x).prev_sample
    return x


class SchedulerLoopContract(SolverContract):
    """Forward cases (scheduler config overrides, steps) against the scheduler's loop."""

    def scheduler(self, **overrides):
        raise NotImplementedError

    def forward_pair(self, case, request):
        overrides, steps = case
        unet, (x, cond, uncond, _) = request.getfixturevalue("unet"), request.getfixturevalue("inputs")
        scheduler = self.scheduler(**dict(overrides))
        scheduler.set_timesteps(steps)
        reference = diffusers_loop(unet, scheduler, x, cond, uncond)
        ours = adpm.sample(unet, x, schedule=scheduler, timesteps=scheduler.timesteps, cond=cond, uncond=uncond,
                           guidance_scale=GUIDANCE, grad=None)
        return ours, reference


def _cases(variants, steps):
    return tuple((tuple(sorted(v.items())), n) for v in variants for n in steps)


class TestPNDM(SchedulerLoopContract):
    SOLVER = "pndm"
    FORWARD_CASES = (
        _cases([{"timestep_spacing": "leading"}, {"timestep_spacing": "trailing", "steps_offset": 0},
                {"timestep_spacing": "linspace", "steps_offset": 0}, {"prediction_type": "v_prediction"}], (1, 2, 3, 7))
        + _cases([{"skip_prk_steps": False}, {"skip_prk_steps": False, "timestep_spacing": "linspace", "steps_offset": 0},
                  {"skip_prk_steps": False, "prediction_type": "v_prediction"}], (4, 9))
    )
    GRADIENT_CASES = ("plms on a PNDMScheduler grid", "prk warm-up", "pndm on a uniform grid")

    def scheduler(self, **overrides):
        return PNDMScheduler(**{**SD15, **overrides})

    def problem(self, case):
        if case == "pndm on a uniform grid":
            return unet_problem(self.SOLVER)
        scheduler = self.scheduler(skip_prk_steps=case != "prk warm-up")
        scheduler.set_timesteps(6)
        return _scheduler_problem(scheduler)


class TestUniPC(SchedulerLoopContract):
    SOLVER = "unipc"
    FORWARD_CASES = _cases([{}, {"prediction_type": "v_prediction"}, {"solver_order": 3},
                            {"disable_corrector": [1]}, {"timestep_spacing": "trailing"},
                            {"predict_x0": False, "final_sigmas_type": "sigma_min"}, {"use_karras_sigmas": True}],
                           (1, 2, 3, 8))
    GRADIENT_CASES = ("unipc on its grid", "unipc order 3", "unipc on a uniform grid")

    def scheduler(self, **overrides):
        return UniPCMultistepScheduler(**SD_BETAS, **overrides)

    def problem(self, case):
        if case == "unipc on a uniform grid":
            return unet_problem(self.SOLVER)
        scheduler = self.scheduler(solver_order=3 if case == "unipc order 3" else 2)
        scheduler.set_timesteps(6)
        return _scheduler_problem(scheduler)


def _scheduler_problem(scheduler):
    """The contracts' UNet problem sampled with the scheduler itself (its twin, its grid)."""
    import _contracts

    unet, inputs = _contracts.tiny_conditional_unet(), _contracts.inputs_f64()

    def gradients(mode):
        x, cond, uncond, weight = inputs
        unet.zero_grad(set_to_none=True)
        x, cond, uncond = (t.clone().requires_grad_() for t in (x, cond, uncond))
        x0 = adpm.sample(unet, x, schedule=scheduler, timesteps=scheduler.timesteps, cond=cond, uncond=uncond,
                         guidance_scale=GUIDANCE, grad=mode)
        (x0 * weight).sum().backward()
        weights = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
        return {"sample": x0.detach(), "x_T": x.grad, "cond": cond.grad, "uncond": uncond.grad, "weights": weights}

    return _contracts.Problem(gradients, lambda ref: None)


def test_pndm_takes_its_own_grid_with_t1_listed_twice(unet, inputs):
    """SD 1.5's list [t₀, t₁, t₁, t₂, …] is accepted as it is; the sampler's grid is its N distinct times, and
    the same times passed once each give the same samples."""
    x, cond, uncond, _ = inputs
    scheduler = PNDMScheduler(**SD15)
    scheduler.set_timesteps(5)
    listed = scheduler.timesteps.tolist()
    assert listed[1] == listed[2]
    sampler = adpm.build_sampler(unet, scheduler, scheduler.timesteps, guidance_scale=GUIDANCE)
    assert sampler.solver.name == "pndm" and sampler.grid.t.tolist() == listed[:2] + listed[3:]
    a = adpm.sample(unet, x, schedule=scheduler, timesteps=scheduler.timesteps, cond=cond, uncond=uncond,
                    guidance_scale=GUIDANCE, grad=None)
    b = adpm.sample(unet, x, schedule=scheduler, timesteps=listed[:2] + listed[3:], cond=cond, uncond=uncond,
                    guidance_scale=GUIDANCE, grad=None)
    c = adpm.sample(unet, x, schedule=scheduler, steps=5, cond=cond, uncond=uncond, guidance_scale=GUIDANCE, grad=None)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_pndm_list_of_another_grid_is_refused_with_the_fix(unet, inputs):
    x, cond, _, _ = inputs
    other = PNDMScheduler(**SD15)
    other.set_timesteps(7)
    scheduler = PNDMScheduler(**SD15)
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match=r"set_timesteps\(N\).*timesteps=scheduler.timesteps"):
        adpm.sample(unet, x, schedule=scheduler, timesteps=other.timesteps, cond=cond, grad=None)


def test_unipc_configurations_diffusers_cannot_finish_are_refused(unet, inputs):
    x, cond, _, _ = inputs
    scheduler = UniPCMultistepScheduler(**SD_BETAS, predict_x0=False)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="final_sigmas_type='sigma_min'"):
        adpm.sample(unet, x, schedule=scheduler, timesteps=scheduler.timesteps, cond=cond, grad=None)
