"""The continuous adjoint and truncation under their contract (``_contracts.GradModeContract``): the adjoint
equals torchdiffeq's odeint_adjoint, converges to the exact gradient at the solver's order, keeps O(1) states
with backsolve, and accepts a coarser backward grid; Truncated(k = N) is back-propagation, k = 1 the last step's."""

import math

import numpy as np
import pytest
import torch
from torchdiffeq import odeint_adjoint

import adjointdpm as adpm
from _contracts import SCHEDULE, GradModeContract, inputs_f64, pytest_generate_tests, unet_problem  # noqa: F401
from conftest import tiny_conditional_unet


def flat_grads(unet, inputs, grad, solver, timesteps):
    x, cond, _, weight = inputs
    unet.zero_grad(set_to_none=True)
    x, cond = x.clone().requires_grad_(), cond.clone().requires_grad_()
    x0 = adpm.sample(unet, x, schedule=SCHEDULE, timesteps=timesteps, cond=cond, solver=solver, grad=grad)
    (x0 * weight).sum().backward()
    return [x.grad, cond.grad, torch.cat([p.grad.flatten() for p in unet.parameters()])]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def odeint_adjoint_gradients(unet, timesteps):
    """torchdiffeq.odeint_adjoint(method="euler") on the ρ-grid of ``timesteps``, the final jump x̂₀ by autograd:
    the gradients of ⟨w, x_0⟩ in the contract's form (no guidance)."""
    x, cond, _, weight = inputs_f64()
    alpha, sigma, rho = SCHEDULE.alpha(timesteps), SCHEDULE.sigma(timesteps), SCHEDULE.rho(timesteps)

    class Drift(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet, self.cond = unet, torch.nn.Parameter(cond.clone())

        def forward(self, r, y):
            r = float(r.detach())
            t = torch.full((y.shape[0],), float(SCHEDULE.t_from_rho(r)), dtype=y.dtype)
            return self.unet(y / math.sqrt(1 + r * r), t, encoder_hidden_states=self.cond).sample

    drift = Drift()
    unet.zero_grad(set_to_none=True)
    y_T = (x / alpha[0]).requires_grad_()
    y = odeint_adjoint(drift, y_T, torch.tensor(rho), method="euler", adjoint_params=tuple(drift.parameters()))[-1]
    x_last = y * alpha[-1]
    eps = unet(x_last, torch.zeros(2, dtype=torch.float64), encoder_hidden_states=drift.cond).sample
    x0 = (x_last - sigma[-1] * eps) / alpha[-1]
    (x0 * weight).sum().backward()
    return {"sample": x0.detach(), "x_T": y_T.grad / alpha[0], "cond": drift.cond.grad, "uncond": None,
            "weights": {n: p.grad.clone() for n, p in unet.named_parameters()}}


class TestAdjoint(GradModeContract):
    """The stored-state Euler adjoint is torchdiffeq's odeint_adjoint on the same ρ-grid (≤ 1e-6); its
    convergence to the exact gradient at the solver's order and its O(1) states are tested below."""

    MODE = adpm.Adjoint(state="stored", solver="euler")
    RTOL = 1e-6
    CASES = (8,)  # steps of a uniform grid, DDIM, no guidance

    def problem(self, case):
        return unet_problem("ddim", 1.0, timesteps=np.linspace(999, 0, case))

    def reference(self, problem, case):
        return odeint_adjoint_gradients(tiny_conditional_unet(), np.linspace(999, 0, case))


class TestTruncated(GradModeContract):
    """Truncated(k = N) is back-propagation, to the last bit almost (elementwise ≤ 1e-10); k < N below."""

    MODE = adpm.Truncated(k=4)
    RTOL = 1e-10
    ELEMENTWISE = True
    CASES = (4,)

    def problem(self, case):
        return unet_problem("ddim", 1.0, timesteps=[999, 700, 400, 100])


@pytest.mark.parametrize(
    "solver, state, min_order",
    [("ddim", "backsolve", 0.85), ("ddim", "stored", 0.85), ("dpmpp2m", "backsolve", 1.5),
     ("dpmpp2m", "stored", 1.5), ("heun", "stored", 1.7)],
)
def test_adjoint_converges_to_exact_at_solver_order(unet, inputs, solver, state, min_order):
    errors = []
    for n in (10, 20, 40):
        timesteps = np.linspace(999, 0, n)
        exact = flat_grads(unet, inputs, "exact", solver, timesteps)
        adjoint = flat_grads(unet, inputs, adpm.Adjoint(state=state), solver, timesteps)
        errors.append([rel(a, b) for a, b in zip(adjoint, exact)])
    errors = np.array(errors)
    orders = np.log2(errors[:-1] / errors[1:])
    print(f"\n{solver}/{state}: relative error vs exact (rows N=10,20,40; cols x_T, cond, weights)\n{errors}"
          f"\nmeasured order\n{orders}")
    assert np.all(orders >= min_order), orders
    assert errors[-1, 0] < 0.05


def test_coarse_backward_grid(unet, inputs):
    """Fewer adjoint steps: cheaper, less accurate, still a descent-quality gradient."""
    timesteps = np.linspace(999, 0, 21)
    exact = flat_grads(unet, inputs, "exact", "heun", timesteps)
    full = flat_grads(unet, inputs, adpm.Adjoint(solver="heun"), "heun", timesteps)
    coarse = flat_grads(unet, inputs, adpm.Adjoint(solver="heun", steps=5), "heun", timesteps)
    assert rel(full[0], exact[0]) < rel(coarse[0], exact[0]) < 0.5
    cosine = torch.nn.functional.cosine_similarity(coarse[0].flatten(), exact[0].flatten(), dim=0)
    assert cosine > 0.9


def test_backsolve_keeps_one_state_stored_keeps_grid(unet, inputs):
    x, cond, _, _ = inputs
    solver = adpm.solvers.make_solver(
        "ddim", adpm.Denoiser(unet, SCHEDULE), adpm.solvers.TimeGrid.from_timesteps(SCHEDULE, np.linspace(999, 0, 30))
    )
    with torch.no_grad():
        _, kept = adpm.Adjoint(state="backsolve").record(solver, x, cond, None)
        _, stored = adpm.Adjoint(state="stored").record(solver, x, cond, None)
        _, coarse = adpm.Adjoint(state="stored", steps=6).record(solver, x, cond, None)
    assert list(kept) == [29]
    assert sorted(stored) == list(range(30))
    assert len(coarse) == 7


def test_truncated_to_the_last_step(unet, inputs):
    x, cond, _, weight = inputs
    timesteps = [999, 700, 400, 100]
    # k = N is back-propagation (TestTruncated); k = 1: the cond gradient is that of the final jump alone, at the state the sampler reached
    one = flat_grads(unet, inputs, adpm.Truncated(k=1), "ddim", timesteps)
    c = cond.clone().requires_grad_()
    solver = adpm.solvers.make_solver("ddim", adpm.Denoiser(unet, SCHEDULE),
                                      adpm.solvers.TimeGrid.from_timesteps(SCHEDULE, np.array(timesteps, float)))
    with torch.no_grad():
        state, hist = x, ()
        for i in range(3):
            state, hist = solver.step(i, state, hist, cond, None)
    last, _ = solver.step(3, state, (), c, None)
    (last * weight).sum().backward()
    torch.testing.assert_close(one[1], c.grad, rtol=1e-10, atol=0)
    # x_T: straight-through in y, ∂x_{N−1}/∂x_T ≈ α_{N−1}/α_0 I, then the exact final-jump VJP
    xs = state.clone().requires_grad_()
    (solver.step(3, xs, (), cond, None)[0] * weight).sum().backward()
    torch.testing.assert_close(one[0], xs.grad * float(SCHEDULE.alpha(100) / SCHEDULE.alpha(999)), rtol=1e-10, atol=0)


def test_multistep_two_pass_fallback_equals_single_pass(unet, inputs, monkeypatch):
    """Growing steps (few-step diffusers grids) take the two-pass route; both routes give one answer."""
    import adjointdpm.gradients.adjoint as adjoint_module

    timesteps = np.linspace(999, 0, 12)
    single = flat_grads(unet, inputs, adpm.Adjoint(solver="multistep"), "dpmpp2m", timesteps)
    monkeypatch.setattr(adjoint_module, "SINGLE_PASS_MIN_WEIGHT", float("inf"))
    two_pass = flat_grads(unet, inputs, adpm.Adjoint(solver="multistep"), "dpmpp2m", timesteps)
    for a, b in zip(two_pass, single):
        assert rel(a, b) < 1e-10
    # a few-step diffusers-like grid where the total weights vanish: finite and close to exact
    timesteps = [999, 700, 400, 150, 20]
    exact = flat_grads(unet, inputs, "exact", "dpmpp2m", timesteps)
    got = flat_grads(unet, inputs, adpm.Adjoint(solver="multistep"), "dpmpp2m", timesteps)
    assert all(torch.isfinite(g).all() for g in got)
    cosine = torch.nn.functional.cosine_similarity(got[0].flatten(), exact[0].flatten(), dim=0)
    assert cosine > 0.5
