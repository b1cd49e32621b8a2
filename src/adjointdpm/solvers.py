"""Probability-flow ODE solvers in exponential-integrator coordinates.

With y = x/α and ρ = σ/α the PF-ODE has no linear part left:  dy/dρ = ε̂(α(ρ) y, t(ρ), c).
Sampling runs over model times t_0 > t_1 > … > t_{N−1}; steps 0…N−2 integrate the ODE from t_i to
t_{i+1}, and the last step jumps to σ = 0, the clean sample x̂₀(x_{N−1}, t_{N−1}) (what DDIM with
``set_alpha_to_one`` and DPM-Solver++ with ``final_sigmas_type="zero"`` do).

    ddim     Euler in ρ:  y_{i+1} = y_i + (ρ_{i+1} − ρ_i) ε̂_i,  i.e.  x_{i+1} = α_{i+1} x̂₀_i + σ_{i+1} ε̂_i
    dpmpp2m  DPM-Solver++(2M), data form, variable step: h = λ_{i+1} − λ_i, r = (λ_i − λ_{i−1})/h,
             D = x̂₀_i + (x̂₀_i − x̂₀_{i−1})/(2r),  x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1}(e^{−h} − 1) D
             (first order at the first step, as diffusers)
    heun     Heun in ρ (two network calls a step): ỹ = y_i + H ε̂_i, y_{i+1} = y_i + H/2 (ε̂_i + ε̂(ỹ, t_{i+1}))

Every solver is a sequence of step maps  (x_{i+1}, h_{i+1}) = Φ_i(x_i, h_i; c, θ), where h is the
solver's history (the previous x̂₀ for the multistep method, nothing otherwise). The gradient modes
only ever call ``step``: that is what makes the exact discrete adjoint possible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .model import Denoiser
from .schedule import VPSchedule

History = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class TimeGrid:
    """Model times t_0 > … > t_{N−1} and their α, σ, λ, ρ (float64)."""

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    lam: np.ndarray
    rho: np.ndarray

    @classmethod
    def from_timesteps(cls, schedule: VPSchedule, timesteps: np.ndarray) -> "TimeGrid":
        t = np.asarray(timesteps, dtype=np.float64)
        return cls(t, schedule.alpha(t), schedule.sigma(t), schedule.lambda_(t), schedule.rho(t))

    def __len__(self) -> int:
        return self.t.size


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

    def step(self, i: int, x, hist: History, cond, uncond) -> tuple[torch.Tensor, History]:
        if i == self.num_steps - 1:
            _, x0 = self.denoiser.eps_and_x0(x, self.grid.t[i], cond, uncond)
            return x0, ()
        return self.ode_step(i, x, hist, cond, uncond)

    def ode_step(self, i: int, x, hist: History, cond, uncond) -> tuple[torch.Tensor, History]:
        raise NotImplementedError


class DDIM(Solver):
    name, order = "ddim", 1

    def ode_step(self, i, x, hist, cond, uncond):
        g = self.grid
        eps, x0 = self.denoiser.eps_and_x0(x, g.t[i], cond, uncond)
        return float(g.alpha[i + 1]) * x0 + float(g.sigma[i + 1]) * eps, ()


class DPMSolverPP2M(Solver):
    name, order = "dpmpp2m", 2

    def ode_step(self, i, x, hist, cond, uncond):
        g = self.grid
        _, x0 = self.denoiser.eps_and_x0(x, g.t[i], cond, uncond)
        h = g.lam[i + 1] - g.lam[i]
        phi = float(np.expm1(-h))  # e^{−h} − 1
        if i == 0:
            d = x0
        else:
            r = (g.lam[i] - g.lam[i - 1]) / h
            d = x0 + (x0 - hist[0]) / float(2 * r)
        x_next = float(g.sigma[i + 1] / g.sigma[i]) * x - float(g.alpha[i + 1]) * phi * d
        return x_next, (x0,)


class Heun(Solver):
    name, order, model_calls_per_step = "heun", 2, 2

    def ode_step(self, i, x, hist, cond, uncond):
        g = self.grid
        step = float(g.rho[i + 1] - g.rho[i])
        y = x / float(g.alpha[i])
        eps = self.denoiser.eps(x, g.t[i], cond, uncond)
        y_pred = y + step * eps
        eps_pred = self.denoiser.eps(float(g.alpha[i + 1]) * y_pred, g.t[i + 1], cond, uncond)
        return float(g.alpha[i + 1]) * (y + 0.5 * step * (eps + eps_pred)), ()


SOLVERS: dict[str, type[Solver]] = {cls.name: cls for cls in (DDIM, DPMSolverPP2M, Heun)}


def make_solver(name: str, denoiser: Denoiser, grid: TimeGrid) -> Solver:
    try:
        return SOLVERS[name](denoiser, grid)
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; use one of {', '.join(SOLVERS)}") from None
