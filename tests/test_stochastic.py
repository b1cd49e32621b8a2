"""Stochastic samplers (DDPM, η-DDIM, Euler ancestral, SDE-DPM-Solver++(2M), LCM / FlowMatchEuler's
stochastic step, trailing one/few-step grids): given the same injected noises each equals its diffusers
scheduler's loop and exact equals back-propagation for x_T, every injected noise, the conditioning and
the weights (each solver's contract; checkpoint's is under its mode's contract); back-propagation equals finite differences; a seeded run equals the run
with its noises stored, and same-seed runs are bit-identical; bad input gets one clear error.

The cases and the diffusers loops driven with our noises are in ``_stochastic_cases.py``.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import adjointdpm as adpm
from _contracts import SolverContract, pytest_generate_tests  # noqa: F401 (parametrises the contracts)
from _stochastic_cases import (CASES, GRAD_CASES, _diffusers_loop, _gradients, _noise, _rel, _sample, _sched, _setup,
                               stochastic_problem)
from adjointdpm.conditioning import floating_leaves, map_floating
from conftest import SD_BETAS


class StochasticSolverContract(SolverContract):
    """A stochastic solver's contract on ``CASES``: cases are (case, steps) for the forward pass (its diffusers
    loop given the same noises; at several steps another noise gives another sample), case names for the
    exact gradient (x_T, every injected noise, the conditioning and the weights)."""

    def forward_pair(self, forward_case, request):
        case, steps = forward_case
        name, make, solver, eta, how = CASES[case]
        family, net, x, cond, uncond = _setup(name)
        noise = _noise(steps, x)
        monkeypatch = request.getfixturevalue("monkeypatch")
        reference = _diffusers_loop(monkeypatch, family, net, make(steps), x, cond, uncond, noise, eta, how)
        ours = _sample(family, net, x, cond, uncond, make(steps), solver, eta, noise, None)
        if steps > 1 and case != "ddim_eta05":  # the noise matters (η = 0.5 is checked by the η = 1 case)
            other = _sample(family, net, x, cond, uncond, make(steps), solver, eta, _noise(steps, x, seed=10), None)
            assert _rel(other, reference) > 1e-3
        return ours, reference

    def problem(self, case):
        return stochastic_problem(case)


def _forward(*cases):
    return tuple((case, steps) for case in cases for steps in (1, 4))


class TestDDPM(StochasticSolverContract):
    FORWARD_CASES = _forward("ddpm", "ddpm_large")
    GRADIENT_CASES = ("ddpm",)


class TestEtaDDIM(StochasticSolverContract):
    FORWARD_CASES = _forward("ddim_eta1", "ddim_eta05")
    GRADIENT_CASES = ("ddim_eta05",)


class TestEulerAncestral(StochasticSolverContract):
    FORWARD_CASES = _forward("euler_ancestral", "euler_ancestral_trailing")
    GRADIENT_CASES = ("euler_ancestral",)


class TestDPMSolverPP2MSDE(StochasticSolverContract):
    FORWARD_CASES = _forward("dpmpp2m_sde", "dpmpp2m_sde_karras_heun", "flow_dpmpp2m_sde")
    GRADIENT_CASES = ("dpmpp2m_sde", "flow_dpmpp2m_sde")


class TestLCM(StochasticSolverContract):
    FORWARD_CASES = _forward("lcm", "lcm_boundary", "flow_stochastic_euler")
    GRADIENT_CASES = ("lcm_boundary", "flow_stochastic_euler")


def test_every_stochastic_solver_and_case_is_under_its_contract():
    contracts = [TestDDPM, TestEtaDDIM, TestEulerAncestral, TestDPMSolverPP2MSDE, TestLCM]
    assert {case for c in contracts for case, _ in c.FORWARD_CASES} == set(CASES)
    assert sorted(case for c in contracts for case in c.GRADIENT_CASES) == sorted(GRAD_CASES)
    assert {CASES[case][2] for case in CASES} == set(adpm.STOCHASTIC_SOLVER_NAMES) | {"ddim"}


def test_one_step_turbo_and_lcm_are_deterministic():
    """One trailing Euler-ancestral step from t = 999 lands on σ = 0, one LCM step returns the denoised
    estimate: the injected noise has no effect (SD-Turbo / SDXL-Turbo / LCM one-step use)."""
    family, net, x, cond, uncond = _setup("sdxl")
    for case in ("euler_ancestral_trailing", "lcm"):
        _, make, solver, eta, _ = CASES[case]
        a = _sample(family, net, x, cond, uncond, make(1), solver, eta, 1, None)
        b = _sample(family, net, x, cond, uncond, make(1), solver, eta, 2, None)
        assert torch.equal(a, b), case
    assert float(make(1).timesteps[0]) >= 998


def test_eta_one_ddim_is_ddpm_on_the_same_grid():
    family, net, x, cond, uncond = _setup("sdxl")
    scheduler = CASES["ddpm"][1](5)
    noise = _noise(5, x)
    ddpm = _sample(family, net, x, cond, uncond, scheduler, "ddpm", 0.0, noise, None)
    ddim = _sample(family, net, x, cond, uncond, scheduler, "ddim", 1.0, noise, None)
    assert _rel(ddim, ddpm) <= 1e-8  # DDPM's variance floor (1e-20) at the last step is the only difference
    deterministic = _sample(family, net, x, cond, uncond, scheduler, "ddim", 0.0, None, None)
    assert _rel(deterministic, ddpm) > 1e-2




def test_truncated_gives_the_exact_gradient_of_the_last_noises_and_none_before():
    name, make, solver, eta, _ = CASES["dpmpp2m_sde"]
    family, net, x, cond, uncond = _setup(name)
    steps, k = 4, 2
    noise = _noise(steps, x)
    weight = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    ref = _gradients(family, net, x, cond, uncond, make(steps), solver, eta, noise, "backprop", weight)
    got = _gradients(family, net, x, cond, uncond, make(steps), solver, eta, noise, adpm.Truncated(k=k), weight)
    assert torch.count_nonzero(got[1][: steps - k]) == 0
    assert _rel(got[1][steps - k:], ref[1][steps - k:]) <= 1e-8
    assert got[0].abs().sum() > 0  # the straight-through estimate for x_T still applies


def test_backprop_equals_finite_differences_on_ddpm():
    name, make, solver, eta, _ = CASES["ddpm"]
    family, net, x, cond, uncond = _setup(name, batch=1)
    steps = 3
    noise = _noise(steps, x)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(x.shape, dtype=x.dtype, generator=gen)
    grads = _gradients(family, net, x, cond, uncond, make(steps), solver, eta, noise, "backprop", weight)

    def loss(dx, dz):
        with torch.no_grad():
            return (_sample(family, net, x + dx, cond, uncond, make(steps), solver, eta, noise + dz, None) * weight).sum()

    vx, vz = torch.randn(x.shape, dtype=x.dtype, generator=gen), torch.randn(noise.shape, dtype=x.dtype, generator=gen)
    h = 1e-5
    fd_x = (loss(h * vx, 0) - loss(-h * vx, 0)) / (2 * h)
    fd_z = (loss(0, h * vz) - loss(0, -h * vz)) / (2 * h)
    assert abs(fd_x - (grads[0] * vx).sum()) <= 1e-6 * max(1.0, abs(fd_x))
    assert abs(fd_z - (grads[1] * vz).sum()) <= 1e-6 * max(1.0, abs(fd_z))


def test_seeded_noise_is_regenerated_and_equals_the_stored_stream():
    name, make, solver, eta, _ = CASES["euler_ancestral"]
    family, net, x, cond, uncond = _setup(name)
    steps = 3
    weight = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(3))

    def run(noise, grad):
        net.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_()
        c = map_floating(lambda t: t.clone().requires_grad_(), cond)
        x0 = _sample(family, net, xs, c, uncond, make(steps), solver, eta, noise, grad)
        if grad is None:
            return x0, None
        (x0 * weight).sum().backward()
        return x0.detach(), [xs.grad, *[leaf.grad for leaf in floating_leaves(c)],
                             torch.cat([p.grad.flatten() for p in net.parameters()])]

    seeded, seeded_grads = run(7, "exact")
    stored, stored_grads = run(adpm.noise_tensor(7, steps, x), "exact")
    assert torch.equal(seeded, stored)
    for a, b in zip(seeded_grads, stored_grads):
        assert _rel(a, b) <= 1e-12
    _, backprop_grads = run(7, "backprop")
    for a, b in zip(seeded_grads, backprop_grads):
        assert _rel(a, b) <= 1e-8
    # same seed, bit-identical; a seeded generator is a seed; another seed is another sample
    assert torch.equal(run(7, None)[0], seeded)
    by_generator = [run(torch.Generator().manual_seed(3), None)[0] for _ in range(2)]
    assert torch.equal(*by_generator)
    assert _rel(run(8, None)[0], seeded) > 1e-3
    # no noise: a seed from torch's global generator, reproducible under torch.manual_seed
    torch.manual_seed(11)
    first = run(None, None)[0]
    torch.manual_seed(11)
    assert torch.equal(run(None, None)[0], first)


def test_a_resumed_stream_continues_where_it_stopped():
    like = torch.zeros(2, 4, dtype=torch.float64)
    full = adpm.noise_tensor(5, 6, like)
    assert torch.equal(adpm.noise_tensor(5, 4, like, offset=2), full[2:])
    assert torch.equal(adpm.SeededNoise(5, offset=3).noise_at(1, like), full[4])


def test_per_sample_seeds_make_each_samples_noises_its_own():
    """noise=[s_1, …, s_B] (or one generator per sample, diffusers' generator=[…]): sample b's noises come
    from s_b alone, so sampling a subset of rows gives those rows' samples; the gradients with the seeds
    regenerated equal those with the noises stored."""
    name, make, solver, eta, _ = CASES["ddpm"]
    family, net, x, cond, uncond = _setup(name, batch=3)
    seeds, steps = [4, 11, 2], 3
    stream = adpm.SeededNoise(seeds)
    like = x
    full = adpm.noise_tensor(seeds, steps, like)
    assert torch.equal(full[:, 1], adpm.noise_tensor([11], steps, like[1:2])[:, 0])
    assert torch.equal(adpm.noise_tensor(stream.rows(torch.tensor([2, 0])).seed, steps, like[:2]), full[:, [2, 0]])
    assert torch.equal(adpm.noise_tensor(stream.rows(slice(1, 3)).seed, steps, like[:2]), full[:, 1:])
    whole = _sample(family, net, x, cond, uncond, make(steps), solver, eta, seeds, None)
    rows = [2, 0]
    pick = lambda tree: map_floating(lambda t: t[rows] if t.shape[0] == 3 else t, tree)  # noqa: E731
    part = _sample(family, net, x[rows], pick(cond), pick(uncond), make(steps), solver, eta, [seeds[r] for r in rows], None)
    assert _rel(part, whole[rows]) <= 1e-10
    by_generators = _sample(family, net, x, cond, uncond, make(steps), solver, eta,
                            [torch.Generator().manual_seed(s) for s in seeds], None)
    assert torch.equal(by_generators, _sample(family, net, x, cond, uncond, make(steps), solver, eta,
                                              [torch.Generator().manual_seed(s) for s in seeds], None))
    assert torch.equal(whole, _sample(family, net, x, cond, uncond, make(steps), solver, eta, full, None))
    grads = []
    for noise in (seeds, full):
        xs = x.clone().requires_grad_()
        _sample(family, net, xs, cond, uncond, make(steps), solver, eta, noise, "exact").square().sum().backward()
        grads.append(xs.grad)
    assert _rel(grads[0], grads[1]) <= 1e-12
    with pytest.raises(ValueError, match="3 samples: give one per sample"):
        _sample(family, net, x, cond, uncond, make(steps), solver, eta, seeds[:2], None)
    with pytest.raises(ValueError, match="cannot be taken apart"):
        adpm.SeededNoise(3).rows([0])


def test_a_noise_tensor_computed_from_a_leaf():
    """DNO-style parametrisations (noise = f(leaf), or the rows of a larger noise tensor still being
    optimised): every mode carries the gradient through f to the leaf, and they agree."""
    name, make, solver, eta, _ = CASES["lcm"]
    family, net, x, cond, uncond = _setup(name)
    grads = {}
    for mode in ("backprop", "checkpoint", "exact", adpm.Exact(memory=0), adpm.Exact(memory=float("inf"))):
        base = torch.cat([_noise(3, x), _noise(3, x, seed=4)], dim=1).requires_grad_()
        rows = torch.tensor([0, 3])  # two of the four samples: a non-leaf row slice, then scaled
        x0 = _sample(family, net, x, cond, uncond, make(3), solver, eta, 0.5 * base[:, rows], mode)
        x0.square().sum().backward()
        grads[str(mode)] = base.grad
    reference = grads.pop("backprop")
    assert reference[:, rows].abs().sum() > 0
    assert reference[:, [1, 2]].abs().sum() == 0, "rows not sampled get no gradient"
    for mode, grad in grads.items():
        assert _rel(grad, reference) <= 1e-8, mode


# ------------------------------------------------------------------------------------------ bad input
def _call(case="ddpm", steps=2, **overrides):
    name, make, solver, eta, _ = CASES[case]
    family, net, x, cond, uncond = _setup(name)
    args = dict(schedule=make(steps), timesteps=make(steps).timesteps, cond=cond, uncond=uncond,
                guidance_scale=family.guidance, solver=solver, eta=eta, noise=_noise(steps, x))
    args.update(overrides)
    return lambda: adpm.sample(net, x, **args)


@pytest.mark.parametrize("overrides, error, message", [
    (dict(solver="dpmpp2m", noise=3), ValueError, "solver='dpmpp2m' is deterministic and injects none"),
    (dict(solver="ddim", eta=0.0, noise=3), ValueError, "is deterministic"),
    (dict(noise=torch.zeros(3, 2, 4, 8, 8, dtype=torch.float64)), ValueError, r"need \(2, 2, 4, 8, 8\)"),
    (dict(noise=torch.zeros(2, 2, 4, 8, 8)), TypeError, "use noise.to"),
    (dict(noise="seed"), TypeError, "noise must be an int seed"),
    (dict(noise=-1), ValueError, "non-negative integer"),
    (dict(solver="ddim", eta=1.5), ValueError, r"eta must lie in \[0, 1\]"),
    (dict(eta=0.5), ValueError, "eta applies to solver='ddim' only"),
    (dict(grad="adjoint"), ValueError, "use grad='exact', 'backprop', 'checkpoint' or 'truncated'"),
    (dict(grad="reversible", solver="ddim", eta=1.0), ValueError, "grad='reversible' differentiates deterministic"),
    (dict(schedule=_sched(DDPMScheduler, 2, **SD_BETAS)), ValueError, "set clip_sample=False"),
    (dict(schedule=_sched(DDPMScheduler, 2, **SD_BETAS, clip_sample=False, variance_type="learned_range")),
     ValueError, "variance_type"),
    (dict(solver="heun"), ValueError, "eta applies to solver='ddim' only|is deterministic"),
])
def test_bad_input(overrides, error, message):
    with pytest.raises(error, match=message):
        _call(**overrides)()


def test_a_clipping_scheduler_is_refused_by_the_deterministic_solvers_too():
    """DDIMScheduler clips x̂₀ by default (clip_sample=True): the samplers here do not, so they say so."""
    for solver in ("ddim", "dpmpp2m"):
        sched = _sched(DDIMScheduler, 2, **SD_BETAS)
        with pytest.raises(ValueError, match="set clip_sample=False and thresholding=False"):
            _call("ddpm", solver=solver, noise=None, schedule=sched, timesteps=sched.timesteps)()


def test_flow_refusals():
    sched = CASES["flow_stochastic_euler"][1](2)
    with pytest.raises(ValueError, match="stochastic_sampling=True but solver='ddim' is deterministic"):
        _call("flow_stochastic_euler", solver="ddim", noise=None, schedule=sched, timesteps=sched.timesteps)()
    with pytest.raises(ValueError, match="infinite where α = 0"):
        _call("flow_stochastic_euler", solver="euler_ancestral")()
