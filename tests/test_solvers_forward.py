"""Each deterministic solver under its contract (``_contracts.SolverContract``): its forward pass reproduces
its twin's step loop (diffusers' DDIM and DPM-Solver++(2M) schedulers to ≤ 1e-5, torchdiffeq's heun2 to
≤ 1e-10) and its exact gradient equals float64 back-propagation; the three converge to each other."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from torchdiffeq import odeint

import adjointdpm as adpm
from _contracts import SolverContract, pytest_generate_tests, unet_problem  # noqa: F401 (parametrises the contracts)
from conftest import SD_BETAS

GUIDANCE = 3.0


def _diffusers_loop(unet, scheduler, x, cond, uncond):
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.expand_as(cond), cond])).sample
            out_u, out_c = out.chunk(2)
            x = scheduler.step(out_u + GUIDANCE * (out_c - out_u), t, x).prev_sample
    return x


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


class DiffusersTwinContract(SolverContract):
    """Forward cases (prediction type, steps): the scheduler's own loop under guidance 3; exact = backprop."""

    FORWARD_CASES = tuple((p, n) for n in (1, 2, 7, 20) for p in ("epsilon", "v_prediction", "sample"))
    SOLVER = ""

    def scheduler(self, prediction_type):
        raise NotImplementedError

    def forward_pair(self, forward_case, request):
        prediction_type, steps = forward_case
        unet, (x, cond, uncond, _) = request.getfixturevalue("unet"), request.getfixturevalue("inputs")
        scheduler = self.scheduler(prediction_type)
        scheduler.set_timesteps(steps)
        reference = _diffusers_loop(unet, scheduler, x, cond, uncond)
        ours = adpm.sample(unet, x, schedule=scheduler, timesteps=scheduler.timesteps, cond=cond, uncond=uncond,
                           guidance_scale=GUIDANCE, solver=self.SOLVER, grad=None)
        return ours, reference

    def problem(self, case):
        return unet_problem(case)


class TestDDIM(DiffusersTwinContract):
    SOLVER = "ddim"
    GRADIENT_CASES = ("ddim",)

    def scheduler(self, prediction_type):
        return DDIMScheduler(**SD_BETAS, set_alpha_to_one=True, clip_sample=False, prediction_type=prediction_type)


class TestDPMSolverPP2M(DiffusersTwinContract):
    SOLVER = "dpmpp2m"
    GRADIENT_CASES = ("dpmpp2m",)

    def scheduler(self, prediction_type):
        return DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                           final_sigmas_type="zero", prediction_type=prediction_type)


class TestHeun(SolverContract):
    """Heun in ρ on dy/dρ = ε̂(α(ρ) y, t(ρ)) then the final jump, against torchdiffeq's heun2."""

    FORWARD_CASES = ("torchdiffeq-heun2-6-steps",)
    FORWARD_RTOL = 1e-10
    GRADIENT_CASES = ("heun",)

    def forward_pair(self, forward_case, request):
        unet, (x, cond, _, _) = request.getfixturevalue("unet"), request.getfixturevalue("inputs")
        schedule = adpm.VPSchedule.from_scheduler(DDIMScheduler(**SD_BETAS))
        timesteps = np.linspace(999, 0, 6)

        def drift(rho, y):
            r = float(rho)
            t = torch.full((y.shape[0],), float(schedule.t_from_rho(r)), dtype=y.dtype)
            return unet(y / math.sqrt(1 + r * r), t, encoder_hidden_states=cond).sample

        rho = torch.tensor(schedule.rho(timesteps))
        with torch.no_grad():
            y_last = odeint(drift, x / float(schedule.alpha(timesteps[0])), rho, method="heun2")[-1]
            x_last = y_last * float(schedule.alpha(timesteps[-1]))
            eps = unet(x_last, torch.zeros(2, dtype=torch.float64), encoder_hidden_states=cond).sample
            reference = (x_last - float(schedule.sigma(0.0)) * eps) / float(schedule.alpha(0.0))
        ours = adpm.sample(unet, x, schedule=schedule, timesteps=timesteps, cond=cond, solver="heun", grad=None)
        return ours, reference

    def problem(self, case):
        return unet_problem(case)


def test_every_deterministic_solver_is_under_its_contract():
    from test_solvers_pndm_unipc import TestPNDM, TestUniPC

    names = {c.GRADIENT_CASES[0] for c in (TestDDIM, TestDPMSolverPP2M, TestHeun)} | {TestPNDM.SOLVER, TestUniPC.SOLVER}
    assert names == set(adpm.SOLVERS)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp2m", "heun"])
def test_solvers_converge_to_each_other(unet, inputs, solver):
    """All three integrate the same ODE: with many steps they agree far better than with few.

    A random UNet sees t through sinusoids of period ≈ 6 timesteps, so its drift is not smooth in t;
    the network is given t/100 to make the ODE smooth, as a trained model's is.
    """
    x, cond, _, _ = inputs
    schedule = adpm.VPSchedule.from_scheduler(DDIMScheduler(**SD_BETAS))

    def smooth(x, t, c):
        return unet(x, t / 100, encoder_hidden_states=c).sample

    fine = adpm.sample(smooth, x, schedule=schedule, steps=400, cond=cond, solver="heun", grad=None)
    coarse = adpm.sample(smooth, x, schedule=schedule, steps=10, cond=cond, solver=solver, grad=None)
    finer = adpm.sample(smooth, x, schedule=schedule, steps=80, cond=cond, solver=solver, grad=None)
    assert _rel(finer, fine) < 0.5 * _rel(coarse, fine)


def test_unconditional_unet_and_callable():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).double().eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    schedule = adpm.VPSchedule.linear()
    direct = adpm.sample(unet, x, schedule=schedule, steps=5, solver="dpmpp2m", grad=None)
    via_callable = adpm.sample(lambda x, t, c: unet(x, t).sample, x, schedule=schedule, steps=5, solver="dpmpp2m", grad=None)
    torch.testing.assert_close(direct, via_callable, rtol=0, atol=0)
    assert torch.isfinite(direct).all()
