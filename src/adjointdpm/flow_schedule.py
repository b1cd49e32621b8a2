"""Flow matching / rectified flow (SD3, SD3.5, Flux, Lumina, …): the straight Gaussian path.

    x_t = (1 − σ) x_0 + σ ε,    α = 1 − σ,    σ = t/T    (model time t ∈ [0, T], T = num_train_timesteps)

as diffusers' ``FlowMatchEulerDiscreteScheduler`` defines it (its ``timesteps`` are σ·T). The network
predicts the velocity v = ε − x_0 ("flow_prediction"). A shift s moves the grid, σ' = sσ/(1 + (s − 1)σ),
and dynamic shifting uses s = e^μ; neither changes the path, so a sampler takes its grid from the
configured scheduler (:func:`adjointdpm.grid.grid_from_scheduler`) and this class only supplies α, σ and
t(λ) between grid points. At t = T (σ = 1) α = 0, so λ = −∞ and ρ = ∞: the solvers integrate in the
coordinates (u, κ) = (x/(α+σ), σ/(α+σ)) = (x, σ), finite on the whole path.
"""

from __future__ import annotations

import numpy as np

from .schedule import ArrayLike, NoiseSchedule, _as_float64


class FlowMatchingSchedule(NoiseSchedule):
    """α = 1 − t/T, σ = t/T; ``shift`` only shapes :meth:`default_timesteps` (FlowMatchEuler's ``shift``)."""

    coordinates = "kappa"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        if num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.T, self.shift = float(num_train_timesteps), float(shift)
        self.t_min, self.t_max = 0.0, self.T

    def sigma(self, t: ArrayLike) -> np.ndarray:
        return _as_float64(t) / self.T

    def alpha(self, t: ArrayLike) -> np.ndarray:
        return 1.0 - _as_float64(t) / self.T

    def t_from_lambda(self, lam: ArrayLike) -> np.ndarray:
        # α/σ = e^λ with α + σ = 1  ⇒  σ = 1/(1 + e^λ) = sigmoid(−λ)
        return self.T / (1.0 + np.exp(_as_float64(lam)))

    def default_timesteps(self, steps: int) -> np.ndarray:
        """FlowMatchEuler's grid for ``steps`` steps without dynamic shifting: σ from 1 to 1/T, then shifted."""
        sigma = np.linspace(1.0, 1.0 / self.T, steps) if steps > 1 else np.array([1.0])
        sigma = self.shift * sigma / (1.0 + (self.shift - 1.0) * sigma)
        return sigma * self.T

    def __repr__(self) -> str:
        return f"FlowMatchingSchedule(num_train_timesteps={self.T:g}, shift={self.shift:g})"
