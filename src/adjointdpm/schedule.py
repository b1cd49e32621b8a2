"""Noise schedules in continuous time: Gaussian paths x_t = α_t x_0 + σ_t ε.

:class:`NoiseSchedule` is the interface the engine uses (α, σ, λ = log(α/σ), ρ = σ/α at any model time,
the inverse t(λ), and the coordinates the solvers integrate in). Variance-preserving schedules are here;
flow matching (α = 1 − σ) is in :mod:`adjointdpm.flow_schedule`.

A VP diffusion has marginals x_t = α_t x_0 + σ_t ε with α_t² + σ_t² = 1. Everything the engine needs
follows from log α(t):

    σ = √(1 − α²),   λ = log(α/σ)  (half log-SNR, decreasing in t),   ρ = σ/α = e^{−λ}.

Because the schedule is VP, α is a function of λ alone: log α = −½ log(1 + e^{−2λ}). Inverting t ↦ λ
therefore reduces to inverting t ↦ log α, which each schedule does exactly for its own interpolation
(no snapping to the nearest training index).

Time is measured in the network's own units ("model time"): training indices 0…N−1 for a discrete
diffusers schedule, [0, T] (T = num_train_timesteps) for the continuous ones. A discrete schedule
interpolates log α piecewise-linearly between training indices, so fractional timesteps are valid.

All scalar arithmetic is in float64 numpy; the engine casts to the sample's dtype where it is used.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

ArrayLike = float | Sequence[float] | np.ndarray | torch.Tensor


def _as_float64(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def log_alpha_from_lambda(lam: ArrayLike) -> np.ndarray:
    """log α = −½ log(1 + e^{−2λ}), stable for λ of either sign."""
    lam = _as_float64(lam)
    return -0.5 * np.logaddexp(0.0, -2.0 * lam)


class NoiseSchedule:
    """A Gaussian path: α(t), σ(t) at model time t in [t_min, t_max], and t(λ).

    ``coordinates`` names the variables the solvers integrate in (see :mod:`adjointdpm.grid`):
    "rho" (y = x/α against ρ = σ/α, the VP choice) or "kappa" (u = x/(α+σ) against κ = σ/(α+σ),
    finite where α = 0).
    """

    t_min: float
    t_max: float
    coordinates = "rho"

    def alpha(self, t: ArrayLike) -> np.ndarray:
        raise NotImplementedError

    def sigma(self, t: ArrayLike) -> np.ndarray:
        raise NotImplementedError

    def t_from_lambda(self, lam: ArrayLike) -> np.ndarray:
        raise NotImplementedError

    def lambda_(self, t: ArrayLike) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.alpha(t)) - np.log(self.sigma(t))

    def rho(self, t: ArrayLike) -> np.ndarray:
        """ρ = σ/α, the noise-to-signal ratio (k-diffusion's σ)."""
        with np.errstate(divide="ignore"):
            return self.sigma(t) / self.alpha(t)

    def t_from_rho(self, rho: ArrayLike) -> np.ndarray:
        rho = _as_float64(rho)
        if np.any(rho <= 0):
            raise ValueError("t_from_rho needs ρ > 0 (ρ = 0 is the clean sample, outside every schedule)")
        return self.t_from_lambda(-np.log(rho))

    def default_timesteps(self, steps: int) -> np.ndarray:
        """``steps`` model times, uniform in time from t_max down to t_min (both included)."""
        if steps == 1:
            return np.array([self.t_max])
        return np.linspace(self.t_max, self.t_min, steps)


class VPSchedule(NoiseSchedule):
    """A VP noise schedule: α, σ, λ, ρ at any continuous model time, and the inverses t(λ), t(ρ).

    Build one with :meth:`from_alphas_cumprod` (a diffusers scheduler's ``alphas_cumprod``),
    :meth:`from_betas`, :meth:`linear` or :meth:`cosine`. Subclasses implement :meth:`log_alpha`
    and :meth:`t_from_log_alpha`; everything else derives from them.
    """

    #: smallest and largest model time at which the schedule is defined (σ > 0 on the whole range)
    t_min: float
    t_max: float

    # -- to implement ------------------------------------------------------------------------
    def log_alpha(self, t: ArrayLike) -> np.ndarray:
        raise NotImplementedError

    def t_from_log_alpha(self, log_alpha: ArrayLike) -> np.ndarray:
        raise NotImplementedError

    # -- derived quantities -------------------------------------------------------------------
    def alpha(self, t: ArrayLike) -> np.ndarray:
        return np.exp(self.log_alpha(t))

    def sigma(self, t: ArrayLike) -> np.ndarray:
        return np.sqrt(-np.expm1(2.0 * self.log_alpha(t)))

    def lambda_(self, t: ArrayLike) -> np.ndarray:
        log_a = self.log_alpha(t)
        return log_a - 0.5 * np.log(-np.expm1(2.0 * log_a))

    def rho(self, t: ArrayLike) -> np.ndarray:
        return np.exp(-self.lambda_(t))

    def t_from_lambda(self, lam: ArrayLike) -> np.ndarray:
        return self.t_from_log_alpha(log_alpha_from_lambda(lam))

    # -- constructors -------------------------------------------------------------------------
    @staticmethod
    def from_alphas_cumprod(alphas_cumprod: ArrayLike) -> "DiscreteVPSchedule":
        return DiscreteVPSchedule(alphas_cumprod)

    @staticmethod
    def from_betas(betas: ArrayLike) -> "DiscreteVPSchedule":
        betas = _as_float64(betas)
        return DiscreteVPSchedule(np.cumprod(1.0 - betas))

    @staticmethod
    def from_scheduler(scheduler) -> "DiscreteVPSchedule":
        """From any diffusers scheduler that exposes ``alphas_cumprod``."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(
                f"{type(scheduler).__name__} has no `alphas_cumprod`; pass a VP diffusers scheduler "
                "(DDIM, DDPM, DPMSolverMultistep, …), build the schedule with VPSchedule.from_betas, or pass "
                "a flow-matching scheduler itself as schedule= (adjointdpm.schedule_from_scheduler reads both)"
            )
        return DiscreteVPSchedule(scheduler.alphas_cumprod)

    @staticmethod
    def linear(beta_min: float = 0.1, beta_max: float = 20.0, num_train_timesteps: int = 1000) -> "LinearVPSchedule":
        return LinearVPSchedule(beta_min, beta_max, num_train_timesteps)

    @staticmethod
    def cosine(s: float = 0.008, num_train_timesteps: int = 1000) -> "CosineVPSchedule":
        return CosineVPSchedule(s, num_train_timesteps)


class DiscreteVPSchedule(VPSchedule):
    """A diffusers-style schedule ᾱ_n (n = 0…N−1) with log α = ½ log ᾱ linear between indices."""

    def __init__(self, alphas_cumprod: ArrayLike):
        abar = _as_float64(alphas_cumprod)
        if abar.ndim != 1 or abar.size < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {abar.shape}")
        if not np.all((abar > 0) & (abar < 1)):
            raise ValueError("alphas_cumprod must lie strictly between 0 and 1 (σ > 0 and α > 0 at every index)")
        if not np.all(np.diff(abar) < 0):
            raise ValueError("alphas_cumprod must be strictly decreasing (more noise at larger timesteps)")
        self.alphas_cumprod = abar
        self._grid = np.arange(abar.size, dtype=np.float64)
        self._log_alpha = 0.5 * np.log(abar)
        self.t_min = 0.0
        self.t_max = float(abar.size - 1)

    def log_alpha(self, t: ArrayLike) -> np.ndarray:
        t = _as_float64(t)
        return np.interp(t, self._grid, self._log_alpha)

    def t_from_log_alpha(self, log_alpha: ArrayLike) -> np.ndarray:
        # log α decreases with t; np.interp needs increasing abscissae, hence the flips.
        return np.interp(_as_float64(log_alpha), self._log_alpha[::-1], self._grid[::-1])

    def __repr__(self) -> str:
        return f"DiscreteVPSchedule(num_train_timesteps={self.alphas_cumprod.size})"


class LinearVPSchedule(VPSchedule):
    """β(s) = β_min + s (β_max − β_min), s = t/T ∈ (0, 1]:  log α = −¼ s² (β_max − β_min) − ½ s β_min."""

    def __init__(self, beta_min: float, beta_max: float, num_train_timesteps: int):
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"need 0 ≤ beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max, self.T = float(beta_min), float(beta_max), float(num_train_timesteps)
        self.t_min = 1e-3 * self.T
        self.t_max = self.T

    def log_alpha(self, t: ArrayLike) -> np.ndarray:
        s = _as_float64(t) / self.T
        return -0.25 * s**2 * (self.beta_max - self.beta_min) - 0.5 * s * self.beta_min

    def t_from_log_alpha(self, log_alpha: ArrayLike) -> np.ndarray:
        # Solve ¼ d s² + ½ β_min s + log α = 0 for s ≥ 0, d = β_max − β_min.
        d, b0 = self.beta_max - self.beta_min, self.beta_min
        la = _as_float64(log_alpha)
        s = 2.0 * (-la) / (0.5 * b0 + np.sqrt(0.25 * b0**2 - d * la))  # stable root of the quadratic
        return s * self.T

    def __repr__(self) -> str:
        return f"LinearVPSchedule(beta_min={self.beta_min}, beta_max={self.beta_max}, T={self.T:g})"


class CosineVPSchedule(VPSchedule):
    """Nichol & Dhariwal: α(s) = cos(π/2 · (s + c)/(1 + c)) / cos(π/2 · c/(1 + c)), s = t/T.

    s is capped below 1 where α would vanish: t_max is where log α reaches that of s = 0.9946
    (the same clipping DPM-Solver applies).
    """

    def __init__(self, s: float = 0.008, num_train_timesteps: int = 1000):
        if s <= 0:
            raise ValueError(f"cosine offset s must be positive, got {s}")
        self.offset, self.T = float(s), float(num_train_timesteps)
        self._log_alpha_0 = math.log(math.cos(math.pi / 2 * self.offset / (1 + self.offset)))
        self.t_min = 1e-3 * self.T
        self.t_max = 0.9946 * self.T

    def log_alpha(self, t: ArrayLike) -> np.ndarray:
        s = _as_float64(t) / self.T
        return np.log(np.cos(np.pi / 2 * (s + self.offset) / (1 + self.offset))) - self._log_alpha_0

    def t_from_log_alpha(self, log_alpha: ArrayLike) -> np.ndarray:
        la = _as_float64(log_alpha) + self._log_alpha_0
        s = 2 * (1 + self.offset) / np.pi * np.arccos(np.exp(la)) - self.offset
        return s * self.T

    def __repr__(self) -> str:
        return f"CosineVPSchedule(s={self.offset}, T={self.T:g})"
