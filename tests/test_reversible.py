"""The reversible baseline (EDICT + step inversion, DOODL) under its contract (``_contracts.GradModeContract``):
its gradient equals float64 back-propagation through the same EDICT sampler; its inversion reconstructs the
states, and it refuses other solvers."""

import numpy as np
import pytest
import torch

import adjointdpm as adpm
from _contracts import SCHEDULE, TIMESTEPS, GradModeContract, pytest_generate_tests, unet_problem  # noqa: F401
from adjointdpm.gradients.reversible import edict_invert_step, edict_step


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


class TestReversible(GradModeContract):
    """Inverting EDICT's steps gives the gradient of back-propagation through the same EDICT sampler (≤ 1e-8),
    and the same sample, bit for bit: one sampler, two ways to differentiate it."""

    MODE = "reversible"
    REFERENCE = adpm.Reversible(backward="autograd")
    SAMPLE_RTOL = 0.0
    CASES = ((3.0, "epsilon"), (1.0, "v_prediction"))
    API_SOLVER = "ddim"

    def problem(self, case):
        guidance_scale, prediction_type = case
        problem = unet_problem("ddim", guidance_scale, prediction_type)

        def reached(ref):
            problem_check(ref)
            weights = torch.cat([g.flatten() for g in ref["weights"].values()])
            assert all(t.abs().max() > 0 for t in (ref["x_T"], ref["cond"], weights))
            assert (ref["uncond"] is None) == (guidance_scale == 1.0)
            assert ref["uncond"] is None or ref["uncond"].abs().max() > 0

        problem_check, problem.check_reference = problem.check_reference, reached
        return problem


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
    solver = adpm.build_sampler(unet, SCHEDULE, np.linspace(999, 0, 12), guidance_scale=5.0).solver
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
