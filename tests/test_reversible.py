"""The reversible baseline (EDICT + step inversion, DOODL): its gradient equals float64 back-propagation
through the same EDICT sampler, its inversion reconstructs the states, and it refuses other solvers."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import adjointdpm as adpm
from adjointdpm.gradients.reversible import edict_invert_step, edict_step
from adjointdpm.model import Denoiser
from adjointdpm.solvers import TimeGrid, make_solver
from conftest import SD_BETAS

SCHEDULE = adpm.VPSchedule.from_scheduler(DDIMScheduler(**SD_BETAS))
TIMESTEPS = [999, 801.5, 600, 350.25, 120, 20]  # fractional times on purpose


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def gradients(unet, inputs, grad, guidance_scale=3.0, prediction_type="epsilon", timesteps=TIMESTEPS):
    x, cond, uncond, weight = inputs
    unet.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    cond = cond.clone().requires_grad_()
    uncond = uncond.clone().requires_grad_() if guidance_scale != 1 else None
    x0 = adpm.sample(unet, x, schedule=SCHEDULE, timesteps=timesteps, cond=cond, uncond=uncond,
                     guidance_scale=guidance_scale, solver="ddim", grad=grad, prediction_type=prediction_type)
    (x0 * weight).sum().backward()
    weights = torch.cat([p.grad.flatten() for p in unet.parameters()])
    return {"sample": x0.detach(), "x_T": x.grad, "cond": cond.grad,
            "uncond": None if uncond is None else uncond.grad, "weights": weights}


@pytest.mark.parametrize("guidance_scale, prediction_type", [(3.0, "epsilon"), (1.0, "v_prediction")])
def test_inverted_gradient_equals_float64_backprop_through_edict(unet, inputs, guidance_scale, prediction_type):
    ref = gradients(unet, inputs, adpm.Reversible(backward="autograd"), guidance_scale, prediction_type)
    got = gradients(unet, inputs, "reversible", guidance_scale, prediction_type)
    assert torch.equal(got["sample"], ref["sample"])  # one sampler, two ways to differentiate it
    for key in ("x_T", "cond", "uncond", "weights"):
        if ref[key] is None:
            assert got[key] is None and guidance_scale == 1.0
            continue
        assert ref[key].abs().max() > 0
        assert rel(got[key], ref[key]) <= 1e-8, key


def test_edict_is_its_own_sampler(unet, inputs):
    """EDICT's sample differs from DDIM's for a real network, and equals it when ε̂ ignores x (both
    copies then see the same ε̂, so the mixing is the identity)."""
    x, cond, uncond, _ = inputs
    kw = dict(schedule=SCHEDULE, timesteps=TIMESTEPS, cond=cond, uncond=uncond, guidance_scale=3.0, solver="ddim")
    with torch.no_grad():
        ddim = adpm.sample(unet, x, grad=None, **kw)
        edict = adpm.sample(unet, x, grad="reversible", **kw)
    assert rel(edict, ddim) > 1e-4

    def blind(x_in, t, c):  # depends on t and c, not on x
        return torch.ones_like(x_in) * (t.view(-1, 1, 1, 1) / 1000) + c.mean()

    with torch.no_grad():
        ddim = adpm.sample(blind, x, grad=None, **kw)
        edict = adpm.sample(blind, x, grad="reversible", **kw)
    assert rel(edict, ddim) <= 1e-13


def test_step_inversion_reconstructs_states(unet, inputs):
    """Inverting each EDICT step recovers its input to float64 rounding, along a 12-step chain with CFG."""
    x, cond, uncond, _ = inputs
    denoiser = Denoiser(unet, SCHEDULE, "epsilon", 5.0)
    solver = make_solver("ddim", denoiser, TimeGrid.from_timesteps(SCHEDULE, np.linspace(999, 0, 12)))
    states = [(x, x)]
    with torch.no_grad():
        for i in range(solver.num_steps):
            states.append(edict_step(solver, i, *states[-1], cond, uncond, 0.93))
        xs, ys = states[-1]
        for i in reversed(range(solver.num_steps)):
            xs, ys = edict_invert_step(solver, i, xs, ys, cond, uncond, 0.93)
            assert rel(xs, states[i][0]) <= 1e-12 and rel(ys, states[i][1]) <= 1e-12, i
    assert torch.equal(states[0][0], x)


def test_autograd_grad_and_lora_style_subset(unet, inputs):
    """torch.autograd.grad works, only parameters with requires_grad are differentiated, and the result
    matches back-propagation."""
    x, cond, uncond, weight = inputs
    for name, p in unet.named_parameters():
        p.requires_grad_("attn" in name)
    params = [p for p in unet.parameters() if p.requires_grad]
    results = []
    for grad in (adpm.Reversible(p=0.8, backward="autograd"), adpm.Reversible(p=0.8)):
        xx = x.clone().requires_grad_()
        x0 = adpm.sample(unet, xx, schedule=SCHEDULE, timesteps=TIMESTEPS[:4], cond=cond, uncond=uncond,
                         guidance_scale=2.0, solver="ddim", grad=grad)
        results.append(torch.autograd.grad((x0 * weight).sum(), [xx, *params]))
    assert all(p.grad is None for p in unet.parameters())
    for a, b in zip(*results):
        assert rel(b, a) <= 1e-8


@pytest.mark.parametrize("solver", ["dpmpp2m", "heun"])
def test_other_solvers_are_refused_clearly(unet, inputs, solver):
    x, cond, _, _ = inputs
    with pytest.raises(ValueError, match="supports solver='ddim' only"):
        adpm.sample(unet, x.requires_grad_(), schedule=SCHEDULE, steps=3, cond=cond, solver=solver, grad="reversible")


@pytest.mark.parametrize("kwargs", [dict(p=0.0), dict(p=1.5), dict(backward="store")])
def test_bad_options(kwargs):
    with pytest.raises(ValueError):
        adpm.Reversible(**kwargs)
