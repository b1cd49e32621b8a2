"""Memoryless samplers: the chains Adjoint Matching samples and differentiates, X_{k+1} = μ(X_k) + s_k ξ_k.

Adjoint Matching reaches p*(x) ∝ p_base(x) e^{λ r(x)} only under a noise schedule that makes X_0 and the
sample independent (memoryless). On the rollout's grid (points k = 0 … K, step k from point k to k+1):

* VP (ε / x₀ / v models): DDPM, i.e. DDIM with η = 1 — the engine's stochastic ``ddpm`` step map
  (:class:`adjointdpm.stochastic.DDPM`, DDPMScheduler's "fixed_small" posterior on the same grid):
      μ(x) = (α' β/σ²) x̂₀(x) + (a σ'²/σ²) x,   a = α/α',  β = σ² − a²σ'²,   s_k = √(σ'² β/σ²)
  with no noise (s_k = 0) where DDPMScheduler draws none (t = 0) or the posterior variance vanishes (a last
  step to σ' = 0).
* Flow matching (α = 1 − σ, v = ε − x₀), diffusers' σ-time: the SDE with diffusion √(2η_t),
      x' = x + (s' − s)[2v + x/(1 − s)] + √(2s(s − s')/(1 − s)) ξ,
  singular at s = 1. As Flow-GRPO's ``sde_step_with_logprob`` (noise level √2) does, 1 − s in the
  noise's denominator is replaced by 1 − σ_1 (the grid's second sigma) at s = 1; its step form
      std² = 2s/(1 − ŝ),  x' = x(1 + std²(s' − s)/(2s)) + v (s' − s)(1 + std²(1 − s)/(2s)) + std √(s − s') ξ,
  ŝ = s below 1 and σ_1 at s = 1, is the formula above wherever s < 1.

``mean(k, x, denoiser, cond, uncond)`` is μ for any denoiser (the current model with guidance for
sampling, the base model without for the lean adjoint and the loss); ``std(k)`` is s_k.
"""

from __future__ import annotations

import math

import torch

from ..flow_schedule import FlowMatchingSchedule
from ..schedule import NoiseSchedule
from ..stochastic import DDPM, DDPM_MIN_VARIANCE, NoiseSource
from .errors import MethodError
from .rollout import Rollout


class _NoNoise(NoiseSource):
    """z_i = 0: the engine's stochastic step returns its mean."""

    def noise_at(self, i, like):
        return torch.zeros_like(like)


class MemorylessChain:
    """The memoryless sampler on a rollout's grid (see the module docstring)."""

    def __init__(self, rollout: Rollout):
        self.rollout = rollout
        self.grid = rollout.grid()
        self.flow = isinstance(rollout.path(), FlowMatchingSchedule)
        self.scheduler = None if isinstance(rollout.schedule, NoiseSchedule) else rollout.schedule
        if not self.flow and self.grid.coordinates != "rho":
            raise MethodError("adjoint-matching samples VP diffusion (DDPM) or flow matching; this schedule is neither")
        self._stds = [self._std(k) for k in range(len(self.grid))]

    @property
    def num_steps(self) -> int:
        return len(self.grid)

    # -- noise standard deviations ------------------------------------------------------------------
    def _std(self, k: int) -> float:
        g = self.grid
        if self.flow:
            s, s_next = g.sigma_at(k), g.sigma_at(k + 1)
            if s <= 0.0:
                raise MethodError("adjoint-matching: the flow grid steps from σ = 0; end the timesteps above 0")
            return self._flow_std_t(k) * math.sqrt(max(s - s_next, 0.0))
        if g.t[k] <= 0:  # DDPMScheduler draws no noise at t = 0
            return 0.0
        a, s, (a_next, s_next) = g.alpha_at(k), g.sigma_at(k), g.step_end(k)
        beta = s * s - (a / a_next) ** 2 * s_next * s_next
        variance = self._ddpm_variance(beta, s, s_next)
        return math.sqrt(variance) if variance > DDPM_MIN_VARIANCE else 0.0

    def _ddpm_variance(self, beta: float, s: float, s_next: float) -> float:
        kind = getattr(getattr(self.scheduler, "config", None), "variance_type", None) or "fixed_small"
        return max(beta, 0.0) if kind == "fixed_large" else s_next * s_next * beta / (s * s)

    def _flow_std_t(self, k: int) -> float:
        """Flow-GRPO's std_t = √(2s/(1 − ŝ))."""
        s = self.grid.sigma_at(k)
        s_hat = s if s < 1.0 else self.grid.sigma_at(1)
        return math.sqrt(2.0 * s / (1.0 - s_hat))

    def std(self, k: int) -> float:
        return self._stds[k]

    # -- means --------------------------------------------------------------------------------------
    def mean(self, k: int, x: torch.Tensor, denoiser, cond, uncond) -> torch.Tensor:
        if not self.flow:
            step = DDPM(denoiser, self.grid, _NoNoise(), self.scheduler)
            return step.step(k, x, (), cond, uncond)[0]
        g = self.grid
        eps, x0 = denoiser.eps_and_x0(x, g.point(k), cond, uncond)
        v = eps - x0
        s, s_next = g.sigma_at(k), g.sigma_at(k + 1)
        dt = s_next - s
        std_t2 = self._flow_std_t(k) ** 2
        return x * (1.0 + std_t2 * dt / (2.0 * s)) + v * (dt * (1.0 + std_t2 * (1.0 - s) / (2.0 * s)))

    def step(self, k: int, x, denoiser, cond, uncond, xi: torch.Tensor) -> torch.Tensor:
        s = self.std(k)
        mu = self.mean(k, x, denoiser, cond, uncond)
        return mu + s * xi if s > 0.0 else mu
