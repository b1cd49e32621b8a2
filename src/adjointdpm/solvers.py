"""Probability-flow ODE solvers in exponential-integrator coordinates, for any Gaussian path.

Sampling runs over the grid's model times t_0 > … > t_{N−1}; step i integrates from t_i to t_{i+1}, the
last one to the grid's end point (the clean sample, α = 1 and σ = 0, unless the scheduler stops earlier).
With (z, τ) the grid's coordinates (z = x/c; see :mod:`adjointdpm.grid`) and f = dz/dτ:

    ddim     Euler in τ:  z_{i+1} = z_i + (τ_{i+1} − τ_i) f_i,  i.e.  x_{i+1} = α_{i+1} x̂₀_i + σ_{i+1} ε̂_i
             (DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler)
    dpmpp2m  DPM-Solver++(2M), data form, variable step: h = λ_{i+1} − λ_i, r = (λ_i − λ_{i−1})/h,
             D = x̂₀_i + (x̂₀_i − x̂₀_{i−1})/(2r),  x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1}(e^{−h} − 1) D
             (DPMSolverMultistepScheduler, VP or flow sigmas; first order at the first step, and at the
             last one when it ends at σ = 0 or the grid has fewer than 15 steps, as diffusers'
             ``lower_order_final``). The formula is finite at α_i = 0 (λ_i = −∞, e^{−h} = 0).
    heun     Heun in τ (two network calls a step, one for a last step to σ = 0):
             z̃ = z_i + H f_i,  z_{i+1} = z_i + H/2 (f_i + f(z̃, t_{i+1}))
    pndm     PLMS / PNDM (PNDMScheduler): Adams–Bashforth on ε̂ fed to DDIM's transfer, with a Heun-like
             first step or a Runge–Kutta warm-up (alias "plms"; :mod:`adjointdpm.pndm`)
    unipc    UniPC (UniPCMultistepScheduler): multistep predictor + corrector (:mod:`adjointdpm.unipc`)

Every solver is a sequence of step maps  (x_{i+1}, h_{i+1}) = Φ_i(x_i, h_i; c, θ), where h is the
solver's history (the previous x̂₀ for the multistep method, nothing otherwise). The gradient modes
only ever call ``step``: that is what makes the exact discrete adjoint possible.
"""

from __future__ import annotations

import numpy as np
import torch

from .grid import TimeGrid
from .model import Denoiser, GridPoint

History = tuple[torch.Tensor, ...]
#: diffusers' DPMSolverMultistep uses lower order at the last step below this many steps
LOWER_ORDER_FINAL_BELOW = 15


class Solver:
    """Base class: ``step(i, x, hist, cond, uncond)`` maps (x_i, h_i) to (x_{i+1}, h_{i+1})."""

    name = "solver"
    order = 1
    model_calls_per_step = 1

    def __init__(self, denoiser: Denoiser, grid: TimeGrid):
        self.denoiser, self.grid = denoiser, grid

    @property
    def num_steps(self) -> int:
        return len(self.grid)

    def predict(self, i: int, x, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂₀) at grid point i."""
        return self.denoiser.eps_and_x0(x, self.grid.point(i), cond, uncond)

    def drift(self, i: int, x, cond, uncond) -> torch.Tensor:
        """dz/dτ in the grid's coordinates at grid point i (ε̂ for ρ, ε̂ − x̂₀ for κ)."""
        return self.grid.drift(*self.predict(i, x, cond, uncond))

    def step(self, i: int, x, hist: History, cond, uncond) -> tuple[torch.Tensor, History]:
        raise NotImplementedError

    def run(self, x, hist: History, cond, uncond, start: int = 0, stop: int | None = None,
            step=None) -> tuple[torch.Tensor, History]:
        """The step loop: Φ_{stop−1} ∘ … ∘ Φ_start applied to (x, hist) (``stop`` default: N), under
        whatever autograd state the caller set. ``step(i, x, hist, cond, uncond)`` replaces ``self.step``
        where a mode wraps or records each step (checkpointing, the stored states of a backward pass)."""
        step = self.step if step is None else step
        for i in range(start, self.num_steps if stop is None else stop):
            x, hist = step(i, x, hist, cond, uncond)
        return x, hist


class DDIM(Solver):
    name, order = "ddim", 1

    def step(self, i, x, hist, cond, uncond):
        g = self.grid
        eps, x0 = self.predict(i, x, cond, uncond)
        alpha_next, sigma_next = g.step_end(i)
        if sigma_next == 0.0:
            return alpha_next * x0, ()
        return alpha_next * x0 + sigma_next * eps, ()


class DPMSolverPP2M(Solver):
    name, order = "dpmpp2m", 2

    def step(self, i, x, hist, cond, uncond):
        g = self.grid
        _, x0 = self.predict(i, x, cond, uncond)
        last = i == self.num_steps - 1
        first_order = i == 0 or (last and (g.ends_clean or self.num_steps < LOWER_ORDER_FINAL_BELOW))
        if first_order:
            d = x0
        else:
            r = (g.lam_at(i) - g.lam_at(i - 1)) / (g.lam_at(i + 1) - g.lam_at(i))
            d = x0 + (x0 - hist[0]) / float(2 * r) if np.isfinite(r) else x0
        alpha_next, sigma_next = g.alpha_at(i + 1), g.sigma_at(i + 1)
        if sigma_next == 0.0:  # e^{−h} = 0
            return alpha_next * d, (x0,)
        if g.sigma_at(i) == 0.0:
            raise ValueError("dpmpp2m cannot step from σ = 0")
        with np.errstate(over="ignore"):
            phi = float(np.expm1(-(g.lam_at(i + 1) - g.lam_at(i))))  # e^{−h} − 1 (−1 where λ_i = −∞)
        return (sigma_next / g.sigma_at(i)) * x - alpha_next * phi * d, (x0,)


class Heun(Solver):
    name, order, model_calls_per_step = "heun", 2, 2

    def step(self, i, x, hist, cond, uncond):
        g = self.grid
        c, c_next = g.scale_at(i), g.scale_at(i + 1)
        step = g.tau_at(i + 1) - g.tau_at(i)
        z = x / c
        f = self.drift(i, x, cond, uncond)
        z_pred = z + step * f
        if g.sigma_at(i + 1) == 0.0:  # Euler into the clean sample, as diffusers' Heun does
            return c_next * z_pred, ()
        at_next = GridPoint(self._t_next(i), g.alpha_at(i + 1), g.sigma_at(i + 1))
        f_pred = g.drift(*self.denoiser.eps_and_x0(c_next * z_pred, at_next, cond, uncond))
        return c_next * (z + 0.5 * step * (f + f_pred)), ()

    def _t_next(self, i: int) -> float:
        g = self.grid
        return float(g.t[i + 1]) if i + 1 < len(g) else float(g.t_end)


# PNDM and UniPC live in their own modules (they import this one); the registry names every deterministic solver
from .pndm import PNDM, PNDMPlan, pndm_times  # noqa: E402
from .unipc import UniPC, unipc_options  # noqa: E402

SOLVERS: dict[str, type[Solver]] = {cls.name: cls for cls in (DDIM, DPMSolverPP2M, Heun, PNDM, UniPC)}
SOLVER_ALIASES = {"euler": "ddim", "dpm++2m": "dpmpp2m", "dpmsolver++": "dpmpp2m", "plms": "pndm"}
#: samplers that inject noise at every step (built with their noise by :mod:`adjointdpm.stochastic`)
STOCHASTIC_SOLVER_NAMES = ("ddpm", "euler_ancestral", "dpmpp2m_sde", "lcm")
STOCHASTIC_ALIASES = {"dpm++2m_sde": "dpmpp2m_sde", "sde-dpmsolver++": "dpmpp2m_sde"}


def solver_name(name: str) -> str:
    name = SOLVER_ALIASES.get(name, STOCHASTIC_ALIASES.get(name, name))
    if name not in SOLVERS and name not in STOCHASTIC_SOLVER_NAMES:
        known = [*SOLVERS, *SOLVER_ALIASES, *STOCHASTIC_SOLVER_NAMES, *STOCHASTIC_ALIASES]
        raise ValueError(f"unknown solver {name!r}; use one of {', '.join(known)}")
    return name


def make_solver(name: str, denoiser: Denoiser, grid: TimeGrid, scheduler=None) -> Solver:
    """The deterministic solver ``name`` on ``grid``; ``scheduler`` (a diffusers scheduler or None) gives PNDM
    its own times where the grid is its ``set_timesteps`` grid, and UniPC its configuration."""
    name = solver_name(name)
    if name in STOCHASTIC_SOLVER_NAMES:
        raise ValueError(f"solver={name!r} injects noise; build it with adjointdpm.stochastic.make_stochastic_solver")
    if name == "pndm":
        return PNDM(denoiser, grid, _pndm_plan(scheduler, grid))
    if name == "unipc":
        return UniPC(denoiser, grid, unipc_options(scheduler))
    return SOLVERS[name](denoiser, grid)


def _pndm_plan(scheduler, grid: TimeGrid) -> PNDMPlan | None:
    """A set PNDMScheduler's own plan when ``grid`` is its grid; None (PLMS on the grid) otherwise."""
    if type(scheduler).__name__ != "PNDMScheduler" or getattr(scheduler, "num_inference_steps", None) is None:
        return None
    own = pndm_times(scheduler)
    if own.shape != grid.t.shape or not np.array_equal(own, grid.t):
        return None
    from .grid import schedule_from_scheduler

    return PNDMPlan.of_scheduler(scheduler, schedule_from_scheduler(scheduler))


__all__ = ["DDIM", "DPMSolverPP2M", "Heun", "PNDM", "SOLVERS", "STOCHASTIC_SOLVER_NAMES", "Solver", "TimeGrid", "UniPC",
           "make_solver", "solver_name"]
