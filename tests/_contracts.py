"""The contracts every solver and every gradient mode is tested against (no tests here), in the style of
diffusers' ``SchedulerCommonTest``: a test class subclasses its contract and names its cases.

* :class:`SolverContract` — the solver's forward pass is its twin's step loop (a diffusers scheduler's, or
  torchdiffeq's for Heun) on the same inputs to ``FORWARD_RTOL``, and its exact gradient equals float64
  back-propagation through it, for x_T, every conditioning tensor, the weights and any injected noises,
  to ``EXACT_RTOL`` (1e-8).
* :class:`GradModeContract` — the mode's gradient equals its reference (float64 back-propagation unless the
  mode says otherwise: finite differences, torchdiffeq's continuous adjoint, its own autograd loop) to its
  own ``RTOL`` on each of its cases, and ``torch.autograd.grad`` through it returns finite gradients of the
  right shapes without touching ``.grad``.

A *problem* is a sampling set-up with a scalar loss L = ⟨w, x_0⟩: called with a gradient mode it returns
every input's gradient (``Gradients``). Test modules import ``pytest_generate_tests`` from here, which
parametrises a contract's ``forward_case`` / ``gradient_case`` / ``mode_case`` / ``fd_case`` by the
subclass's lists (each non-empty: a claim that does not apply is a contract not subclassed).
:class:`FiniteDifferenceContract` adds the check of directional derivatives against central differences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler

import adjointdpm as adpm
from conftest import SD_BETAS, tiny_conditional_unet

SCHEDULE = adpm.VPSchedule.from_scheduler(DDIMScheduler(**SD_BETAS))
TIMESTEPS = [999, 801.5, 600, 350.25, 120, 20]  # fractional times on purpose

#: contract fixture -> the subclass attribute listing its cases
CASE_LISTS = {"forward_case": "FORWARD_CASES", "gradient_case": "GRADIENT_CASES", "mode_case": "CASES",
              "fd_case": "FD_CASES"}


def pytest_generate_tests(metafunc):
    cls = metafunc.cls
    for fixture, attribute in CASE_LISTS.items():
        if cls is not None and fixture in metafunc.fixturenames:
            cases = list(getattr(cls, attribute))
            metafunc.parametrize(fixture, cases, ids=[str(c) for c in cases])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------ problems
#: input name -> its gradient (None: no gradient reached it); "weights" maps parameter names to gradients
Gradients = dict


@dataclass
class Problem:
    """``gradients(mode) -> Gradients``; ``check_reference(ref)`` asserts what a reference must show."""

    gradients: Callable[[object], Gradients]
    check_reference: Callable[[Gradients], None] = lambda ref: None


def inputs_f64():
    """x_T (2, 2, 8, 8), cond (2, 3, 8), uncond (1, 3, 8) and a loss weight, float64 (conftest's ``inputs``)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=g)
    cond = torch.randn(2, 3, 8, dtype=torch.float64, generator=g)
    uncond = torch.randn(1, 3, 8, dtype=torch.float64, generator=g)
    return x, cond, uncond, torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=g)


def unet_gradients(unet, inputs, grad, solver, guidance_scale=3.0, prediction_type="epsilon", timesteps=TIMESTEPS):
    """Gradients of ⟨w, x_0⟩ of the tiny conditional UNet on ``SCHEDULE`` at ``timesteps``."""
    x, cond, uncond, weight = inputs
    unet.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    cond = cond.clone().requires_grad_()
    uncond = uncond.clone().requires_grad_() if guidance_scale != 1 else None
    x0 = adpm.sample(unet, x, schedule=SCHEDULE, timesteps=timesteps, cond=cond, uncond=uncond,
                     guidance_scale=guidance_scale, solver=solver, grad=grad, prediction_type=prediction_type)
    (x0 * weight).sum().backward()
    weights = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    return {"sample": x0.detach(), "x_T": x.grad, "cond": cond.grad,
            "uncond": None if uncond is None else uncond.grad, "weights": weights}


def unet_problem(solver, guidance_scale=3.0, prediction_type="epsilon", timesteps=TIMESTEPS) -> Problem:
    unet, inputs = tiny_conditional_unet(), inputs_f64()

    def every_weight_reached(ref):
        assert len(ref["weights"]) == len(list(unet.parameters()))

    return Problem(lambda mode: unet_gradients(unet, inputs, mode, solver, guidance_scale, prediction_type, timesteps),
                   every_weight_reached)


def assert_same_gradients(got: Gradients, ref: Gradients, rtol: float, *, elementwise: bool = False,
                          sample_rtol: float | None = None) -> None:
    """Every input's gradient within ``rtol`` of the reference's — relative in norm, or ``elementwise``
    (``assert_close(rtol, atol=0)``) — and the same inputs reached; the samples, where both give them,
    within ``sample_rtol`` (default ``rtol``; 0: identical)."""
    assert got.keys() == ref.keys()
    for key, want in ref.items():
        have = got[key]
        if want is None:
            assert have is None, key
            continue
        assert have is not None, f"{key} received no gradient"
        if isinstance(want, dict):
            assert have.keys() == want.keys(), key
            have, want = (torch.cat([g.flatten() for g in d.values()]) for d in (have, want))
        tol = rtol if key != "sample" or sample_rtol is None else sample_rtol
        if tol == 0:
            assert torch.equal(have, want), key
        elif elementwise:
            torch.testing.assert_close(have, want, rtol=tol, atol=0, msg=key)
        else:
            err = rel(have, want)
            assert err <= tol, f"{key}: relative error {err:.2e}"


# ------------------------------------------------------------------------------ contracts
class SolverContract:
    """Forward: the solver's twin loop. Exact: its exact gradient is float64 back-propagation through it."""

    FORWARD_CASES: tuple = ()
    FORWARD_RTOL = 1e-5
    GRADIENT_CASES: tuple = ()
    EXACT_RTOL = 1e-8

    def forward_pair(self, case, request) -> tuple[torch.Tensor, torch.Tensor]:
        """(the engine's sample, the twin loop's) for ``case``."""
        raise NotImplementedError

    def problem(self, case) -> Problem:
        raise NotImplementedError

    def test_forward_equals_its_twin(self, forward_case, request):
        ours, reference = self.forward_pair(forward_case, request)
        err = rel(ours, reference)
        assert err <= self.FORWARD_RTOL, f"{forward_case}: {err:.2e}"

    def test_exact_gradient_equals_float64_backprop(self, gradient_case):
        problem = self.problem(gradient_case)
        ref = problem.gradients("backprop")
        problem.check_reference(ref)
        assert_same_gradients(problem.gradients("exact"), ref, self.EXACT_RTOL)


class GradModeContract:
    """The mode's gradient equals its reference on each case, and autograd.grad works through it."""

    MODE: object = None
    REFERENCE: object = "backprop"
    RTOL = 1e-8
    ELEMENTWISE = False
    SAMPLE_RTOL: float | None = None
    CASES: tuple = ()
    #: solver of the autograd.grad check (the reversible mode supports DDIM only)
    API_SOLVER = "dpmpp2m"

    def problem(self, case) -> Problem:
        """Default: the tiny UNet, ``case`` = solver or (solver, guidance_scale, prediction_type)."""
        return unet_problem(*((case,) if isinstance(case, str) else case))

    def reference(self, problem: Problem, case) -> Gradients:
        return problem.gradients(self.REFERENCE)

    def test_gradient_equals_its_reference(self, mode_case):
        problem = self.problem(mode_case)
        ref = self.reference(problem, mode_case)
        problem.check_reference(ref)
        assert_same_gradients(problem.gradients(self.MODE), ref, self.RTOL, elementwise=self.ELEMENTWISE,
                              sample_rtol=self.SAMPLE_RTOL)

    def test_autograd_grad_leaves_dot_grad_alone(self):
        unet = tiny_conditional_unet()
        x, cond, _, weight = inputs_f64()
        source = cond.clone().requires_grad_()
        params = list(unet.parameters())[:3]
        x0 = adpm.sample(unet, x, schedule=SCHEDULE, timesteps=TIMESTEPS[:4], cond=2 * source,
                         solver=self.API_SOLVER, grad=self.MODE)
        grads = torch.autograd.grad((x0 * weight).sum(), [source, *params])
        assert all(p.grad is None for p in unet.parameters()), "autograd.grad must not touch .grad"
        assert all(g.shape == t.shape and torch.isfinite(g).all() for g, t in zip(grads, [source, *params]))
        assert grads[0].abs().sum() > 0


class FiniteDifferenceContract:
    """The mode's directional derivatives of L equal central finite differences (≤ 1e-6) on ``FD_CASES`` (solvers)."""

    MODE: object = None
    FD_CASES: tuple = ()

    def test_directional_derivatives_equal_finite_differences(self, fd_case):
        """L(x_0) along random directions of x_T, cond and one weight tensor, by central differences."""
        unet, inputs = tiny_conditional_unet(), inputs_f64()
        x, cond, uncond, weight = inputs
        name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        param = dict(unet.named_parameters())[name]
        ref = unet_gradients(unet, inputs, self.MODE, fd_case)
        g = torch.Generator().manual_seed(5)

        def loss(x=x, cond=cond):
            with torch.no_grad():
                x0 = adpm.sample(unet, x, schedule=SCHEDULE, timesteps=TIMESTEPS, cond=cond, uncond=uncond,
                                 guidance_scale=3.0, solver=fd_case, grad=None)
                return (x0 * weight).sum().item()

        eps = 1e-6
        for key, base in (("x_T", x), ("cond", cond)):
            v = torch.randn(base.shape, dtype=base.dtype, generator=g)
            arg = "x" if key == "x_T" else "cond"
            fd = (loss(**{arg: base + eps * v}) - loss(**{arg: base - eps * v})) / (2 * eps)
            assert abs(fd - (ref[key] * v).sum().item()) <= 1e-6 * abs(fd), key
        v = torch.randn(param.shape, dtype=param.dtype, generator=g)
        with torch.no_grad():
            param += eps * v
            up = loss()
            param -= 2 * eps * v
            down = loss()
            param += eps * v
        fd = (up - down) / (2 * eps)
        assert abs(fd - (ref["weights"][name] * v).sum().item()) <= 1e-6 * abs(fd)
