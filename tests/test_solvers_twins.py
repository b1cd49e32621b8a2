"""Every diffusers scheduler class maps to the engine solver that takes its steps, or to one error naming the
supported classes and ``solver=`` / ``--solver``; ``adpm.sample(schedule=scheduler)`` without ``solver=`` uses it."""

import pytest
import torch
import diffusers

import adjointdpm as adpm
from adjointdpm.twins import SUPPORTED, NoTwinError, twin_solver
from conftest import SD_BETAS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning")

TWINS = [
    ("DDIMScheduler", {}, "ddim"),
    ("EulerDiscreteScheduler", {}, "ddim"),
    ("FlowMatchEulerDiscreteScheduler", {}, "ddim"),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, "lcm"),
    ("DPMSolverMultistepScheduler", {}, "dpmpp2m"),
    ("DPMSolverMultistepScheduler", {"solver_order": 1}, "ddim"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "dpmpp2m_sde"),
    ("HeunDiscreteScheduler", {}, "heun"),
    ("PNDMScheduler", {"skip_prk_steps": True}, "pndm"),
    ("UniPCMultistepScheduler", {}, "unipc"),
    ("EulerAncestralDiscreteScheduler", {}, "euler_ancestral"),
    ("DDPMScheduler", {}, "ddpm"),
    ("LCMScheduler", {}, "lcm"),
]


def _make(name, **config):
    cls = getattr(diffusers, name)
    return cls(**config) if name.startswith("FlowMatch") else cls(**SD_BETAS, **config)


@pytest.mark.parametrize("name, config, solver", TWINS, ids=[f"{n}-{s}" for n, _, s in TWINS])
def test_each_supported_class_has_its_twin(name, config, solver):
    assert twin_solver(_make(name, **config)) == solver
    assert adpm.stochastic.is_stochastic(solver, 0.0) == (solver in adpm.STOCHASTIC_SOLVER_NAMES)


def test_the_table_lists_every_supported_class():
    assert {name for name, _, _ in TWINS} == set(SUPPORTED)


@pytest.mark.parametrize("scheduler", [
    lambda: diffusers.KDPM2DiscreteScheduler(**SD_BETAS),
    lambda: diffusers.DEISMultistepScheduler(**SD_BETAS),
    lambda: diffusers.DPMSolverMultistepScheduler(**SD_BETAS, solver_order=3),
    lambda: diffusers.DPMSolverMultistepScheduler(**SD_BETAS, solver_type="heun"),
], ids=["KDPM2", "DEIS", "DPMSolver-order-3", "DPMSolver-heun"])
def test_a_class_without_twin_gets_one_error_naming_the_supported_ones_and_solver(unet, inputs, scheduler):
    scheduler = scheduler()
    x, cond, _, _ = inputs
    scheduler.set_timesteps(4)
    with pytest.raises(NoTwinError) as raised:
        adpm.sample(unet, x, schedule=scheduler, timesteps=scheduler.timesteps[:4], cond=cond, grad=None)
    message = str(raised.value)
    assert type(scheduler).__name__ in message and "--solver" in message and "solver=" in message
    assert all(name in message for name in SUPPORTED)
    # an explicit solver samples its noise schedule on a grid
    out = adpm.sample(unet, x, schedule=scheduler, steps=None, timesteps=[999.0, 500.0, 20.0], cond=cond,
                      solver="dpmpp2m", grad=None)
    assert torch.isfinite(out).all()


def test_without_solver_the_scheduler_twin_is_used(unet, inputs):
    x, cond, _, _ = inputs
    scheduler = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, final_sigmas_type="zero")
    scheduler.set_timesteps(5)
    implicit = adpm.sample(unet, x, schedule=scheduler, timesteps=scheduler.timesteps, cond=cond, grad=None)
    explicit = adpm.sample(unet, x, schedule=scheduler, timesteps=scheduler.timesteps, cond=cond, solver="dpmpp2m",
                           grad=None)
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    schedule = adpm.VPSchedule.from_scheduler(scheduler)
    assert adpm.build_sampler(unet, schedule, steps=3).solver.name == "ddim"  # a NoiseSchedule: DDIM
