"""The sampler's time grid and the coordinates the solvers integrate in.

A grid is N model times t_0 > … > t_{N−1} with their path coefficients (α_i, σ_i), plus the end point
(α_N, σ_N) of the last step: (1, 0), the clean sample, unless the scheduler stops earlier (DDIM with
``set_alpha_to_one=False`` ends at ᾱ_0, DPM-Solver with ``final_sigmas_type="sigma_min"`` at σ_min).

Coordinates. Write z = x/c and τ for a scale c(t) and a time τ(t) in which α/c and σ/c are affine; with
x = α x̂₀ + σ ε̂ held fixed the probability-flow ODE is dz/dτ = d(α/c)/dτ · x̂₀ + d(σ/c)/dτ · ε̂, and one
Euler step in (z, τ) is exactly DDIM, x' = α' x̂₀ + σ' ε̂, whichever pair is used:

    "rho"    c = α,      τ = ρ = σ/α:       dz/dτ = ε̂           (VP; y = x/α; no linear part for ε-models)
    "kappa"  c = α + σ,  τ = κ = σ/(α+σ):   dz/dτ = ε̂ − x̂₀      (finite at α = 0; flow matching: z = x, τ = σ)

(check: ρ = κ/(1 − κ), y = u/(1 − κ), dρ/dκ = (1 − κ)⁻².) Higher-order solvers and the continuous adjoint
do differ between the two; VP schedules use "rho" (the ε-form of the paper), flow matching "kappa".

From a diffusers scheduler (:func:`grid_from_scheduler`), the grid is the scheduler's own: the model
times are its ``timesteps`` and (α, σ) come from its ``sigmas`` (ρ for VP k-diffusion-style schedulers,
σ for flow matching) where it has them, so fractional, Karras and shifted grids are reproduced exactly as
diffusers interpolates them. ``input_scale`` maps the pipeline's ``latents=`` (unit noise) to the state
x_0 of the path: the pipeline multiplies by ``init_noise_sigma``, and k-diffusion-style schedulers keep
their state as y = x/α, so x = α_0 · init_noise_sigma · latents there (1 · latents for DDIM, DPM-Solver,
flow matching).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .flow_schedule import FlowMatchingSchedule
from .model import GridPoint
from .schedule import DiscreteVPSchedule, NoiseSchedule, VPSchedule

COORDINATES = ("rho", "kappa")


def _float64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


@dataclass(frozen=True)
class TimeGrid:
    """Model times t_0 > … > t_{N−1}, their α, σ, λ, ρ (float64), the end point and the coordinates."""

    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    lam: np.ndarray
    rho: np.ndarray
    alpha_end: float = 1.0
    sigma_end: float = 0.0
    t_end: float | None = None  # model time of the end point when σ_end > 0
    coordinates: str = "rho"
    input_scale: float = 1.0
    #: (α, σ) each step lands on, where a scheduler's step target is not the next grid point (DDIM and DDPM
    #: step from t to t − T//N, which need not be the next listed timestep); None: the next point
    targets: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_path(cls, t, alpha, sigma, *, alpha_end=1.0, sigma_end=0.0, t_end=None, coordinates="rho",
                  input_scale=1.0, targets=None) -> "TimeGrid":
        t, alpha, sigma = _float64(t), _float64(alpha), _float64(sigma)
        if coordinates not in COORDINATES:
            raise ValueError(f"unknown coordinates {coordinates!r}; use one of {', '.join(COORDINATES)}")
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)
            rho = sigma / alpha
        return cls(t, alpha, sigma, lam, rho, float(alpha_end), float(sigma_end), t_end, coordinates, float(input_scale),
                   targets)

    @classmethod
    def from_timesteps(cls, schedule: NoiseSchedule, timesteps) -> "TimeGrid":
        """The grid of ``schedule`` at ``timesteps``, ending at the clean sample."""
        t = _float64(timesteps)
        return cls.from_path(t, schedule.alpha(t), schedule.sigma(t), coordinates=schedule.coordinates)

    def __len__(self) -> int:
        return self.t.size

    # -- points 0…N (N is the end point) ----------------------------------------------------------
    def alpha_at(self, i: int) -> float:
        return self.alpha_end if i == len(self) else float(self.alpha[i])

    def sigma_at(self, i: int) -> float:
        return self.sigma_end if i == len(self) else float(self.sigma[i])

    def lam_at(self, i: int) -> float:
        if i < len(self):
            return float(self.lam[i])
        return np.inf if self.sigma_end == 0 else float(np.log(self.alpha_end) - np.log(self.sigma_end))

    def step_end(self, i: int) -> tuple[float, float]:
        """(α, σ) that step i lands on: the next grid point, or the scheduler's own step target."""
        if self.targets is None:
            return self.alpha_at(i + 1), self.sigma_at(i + 1)
        return float(self.targets[0][i]), float(self.targets[1][i])

    def point(self, i: int) -> GridPoint:
        """(t_i, α_i, σ_i) as the network and the prediction conversions take them (i < N)."""
        return GridPoint(float(self.t[i]), float(self.alpha[i]), float(self.sigma[i]))

    def scale_at(self, i: int) -> float:
        """c_i: the state is z = x/c."""
        a, s = self.alpha_at(i), self.sigma_at(i)
        return a if self.coordinates == "rho" else a + s

    def tau_at(self, i: int) -> float:
        """τ_i: the time variable of the coordinates (ρ or κ)."""
        a, s = self.alpha_at(i), self.sigma_at(i)
        return s / a if self.coordinates == "rho" else s / (a + s)

    @property
    def ends_clean(self) -> bool:
        return self.sigma_end == 0.0

    def drift(self, eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """dz/dτ from the predictions (ε̂ in ρ-coordinates, ε̂ − x̂₀ in κ-coordinates)."""
        return eps if self.coordinates == "rho" else eps - x0


# ------------------------------------------------------------------------------ diffusers schedulers
def is_flow_scheduler(scheduler) -> bool:
    config = getattr(scheduler, "config", None)
    return "FlowMatch" in type(scheduler).__name__ or bool(getattr(config, "use_flow_sigmas", False))


def schedule_from_scheduler(scheduler) -> NoiseSchedule:
    """The continuous path of a configured diffusers scheduler (VP from ``alphas_cumprod``, or flow matching)."""
    if isinstance(scheduler, NoiseSchedule):
        return scheduler
    if is_flow_scheduler(scheduler):
        config = scheduler.config
        return FlowMatchingSchedule(int(getattr(config, "num_train_timesteps", 1000)),
                                    float(getattr(config, "shift", None) or getattr(config, "flow_shift", 1.0) or 1.0))
    return VPSchedule.from_scheduler(scheduler)


def prediction_type_of(scheduler) -> str | None:
    """The scheduler's prediction type (flow matching schedulers without one predict the velocity)."""
    config = getattr(scheduler, "config", None)
    kind = getattr(config, "prediction_type", None)
    if kind is None and is_flow_scheduler(scheduler):
        return "flow_prediction"
    if kind == "epsilon" and is_flow_scheduler(scheduler):
        return "flow_prediction"  # use_flow_sigmas with the default prediction type is a velocity model
    return kind


def pndm_grid_times(scheduler, timesteps) -> np.ndarray:
    """The model times a PNDMScheduler steps from: its N distinct times when ``timesteps`` is its own list
    (``scheduler.timesteps``, which repeats t₁ for PLMS's first step and lists the Runge–Kutta stages) or
    those distinct times themselves; otherwise (or for another scheduler) ``timesteps`` unchanged."""
    if type(scheduler).__name__ != "PNDMScheduler" or getattr(scheduler, "num_inference_steps", None) is None:
        return timesteps
    from .pndm import pndm_times

    t = _float64(timesteps)
    own, listed = pndm_times(scheduler), _float64(scheduler.timesteps)
    if (t.shape == listed.shape and np.array_equal(t, listed)) or (t.shape == own.shape and np.array_equal(t, own)):
        return own
    return timesteps


def _same_grid(timesteps: np.ndarray, scheduler) -> bool:
    own = getattr(scheduler, "timesteps", None)
    if own is None or getattr(scheduler, "num_inference_steps", None) is None:
        return False
    own = _float64(own)
    return own.shape == timesteps.shape and np.allclose(own, timesteps, rtol=0, atol=1e-6 * max(1.0, own.max()))


def grid_from_scheduler(scheduler, schedule: NoiseSchedule, timesteps) -> TimeGrid:
    """The grid a configured diffusers scheduler steps through at ``timesteps`` (see the module docstring)."""
    t = _float64(timesteps)
    n = t.size
    flow = is_flow_scheduler(scheduler)
    sigmas = getattr(scheduler, "sigmas", None)
    same = _same_grid(t, scheduler)
    if same and sigmas is not None and len(sigmas) == n + 1:
        table = _float64(sigmas)
        if flow:
            sigma, alpha = table, 1.0 - table
        else:  # k-diffusion-style ρ
            alpha = 1.0 / np.sqrt(1.0 + table**2)
            sigma = table * alpha
        end_t = None if sigma[n] == 0 else float(schedule.t_from_lambda(np.log(alpha[n]) - np.log(sigma[n])))
        input_scale = 1.0
        init = float(getattr(scheduler, "init_noise_sigma", 1.0))
        if not flow and init != 1.0:
            input_scale = float(alpha[0]) * init
        return TimeGrid.from_path(t, alpha[:n], sigma[:n], alpha_end=alpha[n], sigma_end=sigma[n], t_end=end_t,
                                  coordinates=schedule.coordinates, input_scale=input_scale)
    grid = TimeGrid.from_timesteps(schedule, t)
    if not isinstance(schedule, DiscreteVPSchedule):
        return grid
    final = getattr(scheduler, "final_alpha_cumprod", None)  # DDIM: ᾱ at the end of the last step
    abar_end = 1.0 if final is None else float(final)
    end = dict(alpha_end=np.sqrt(abar_end), sigma_end=np.sqrt(1 - abar_end))
    if abar_end < 1.0:
        end["t_end"] = float(schedule.t_from_log_alpha(0.5 * np.log(abar_end)))
    targets = _previous_timestep_targets(scheduler, schedule, t, same, abar_end)
    if abar_end == 1.0 and targets is None:
        return grid
    return TimeGrid.from_path(t, grid.alpha, grid.sigma, coordinates=schedule.coordinates, targets=targets, **end)


def _previous_timestep_targets(scheduler, schedule, t: np.ndarray, same: bool, abar_end: float):
    """DDIM and DDPM step from t to t − T//N (ᾱ_end below 0); the targets where those differ from the grid."""
    name = type(scheduler).__name__
    if not same or name not in ("DDIMScheduler", "DDPMScheduler") or getattr(scheduler, "custom_timesteps", False):
        return None
    ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    previous = t - ratio
    if np.array_equal(previous[:-1], t[1:]):
        return None
    alpha = np.where(previous >= 0, schedule.alpha(np.maximum(previous, 0)), np.sqrt(abar_end))
    sigma = np.where(previous >= 0, schedule.sigma(np.maximum(previous, 0)), np.sqrt(1 - abar_end))
    return alpha, sigma
