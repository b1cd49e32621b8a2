"""PNDM: pseudo linear multistep (PLMS, as Stable Diffusion 1.x ships it) and its Runge–Kutta warm-up.

Every PNDM stage is the same *transfer* of a state x at (α, σ) to (α', σ') with a noise estimate ε′,

    x' = (α'/α) x + (σ' − α'σ/α) ε′          (= α' x̂₀ + σ' ε′, x̂₀ = (x − σ ε′)/α: DDIM's step;
                                             PNDM's formula (9) is this on a VP path)

and the methods differ in which ε′ they feed it. With ε_k the network's estimate at step k:

    plms, first step (N ≥ 2)   ε_0 at t_0; provisional x̃ = transfer(x_0, t_0 → p, ε_0); ε̃ at t_1 on x̃;
                               x_1 = transfer(x_0, f → t_1, (ε_0 + ε̃)/2)          (Heun-like; ε̃ is not kept)
    plms, later steps          x_{i+1} = transfer(x_i, t_i → q_i, AB(ε_i, history)):  (3ε_i − ε_{i−1})/2,
                               (23ε_i − 16ε_{i−1} + 5ε_{i−2})/12, (55ε_i − 59ε_{i−1} + 37ε_{i−2} − 9ε_{i−3})/24
                               (the history holds the last three kept estimates: ε_0, then one per step)
    prk (the warm-up, 4 calls) from s: ε_a at c_0 on x; ε_b at c_1 on transfer(x, s → c_0 − δ, ε_a);
                               ε_c at c_2 on transfer(x, s → c_1, ε_b); ε_d at c_3 on transfer(x, s → c_2 − δ, ε_c);
                               x' = transfer(x, s → c_3, (ε_a + 2ε_b + 2ε_c + ε_d)/6); ε_a is kept

On a PNDMScheduler's own grid (``set_timesteps(N)``) the times are diffusers' exactly: with r = T // N and
δ = r // 2, p = t_0 − r, f = t_1 + r, q_i = t_i − r (below 0: the scheduler's ``final_alpha_cumprod``), and
the prk stages read ``prk_timesteps`` four at a time (the warm-up covers the four highest times, so it needs
N ≥ 4, as diffusers does); ``timesteps`` lists t_1 twice (the first step's two calls). On any other grid (a :class:`NoiseSchedule`, a grid of the user's) p = f = t_1 … the next point,
q_i = t_{i+1}, and the warm-up is the plms first step. With ``prediction_type="v_prediction"`` the
scheduler combines the network's v outputs and converts the combination at the transfer's start,
ε′ = α v′ + σ x, so the kept estimates are v = α ε̂ − σ x̂₀ there (exactly the network's v).

Each step is a map (x_{i+1}, h_{i+1}) = Φ_i(x_i, h_i) with h the kept estimates, so every gradient mode
differentiates it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .grid import TimeGrid
from .model import Denoiser, GridPoint
from .solvers import History, Solver

#: Adams–Bashforth weights on (ε_i, ε_{i−1}, …), by how many estimates there are
ADAMS_BASHFORTH = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}

Coefficients = tuple[float, float]  # (α, σ)


@dataclass(frozen=True)
class PNDMStep:
    """One step of the plan: ``kind`` "plms" | "first" | "prk"; ``calls`` the network's points; ``start`` the
    (α, σ) every transfer of the step starts from; ``provisional`` the targets of the intermediate transfers
    (first: one, prk: three); ``end`` the step's target."""

    kind: str
    calls: tuple[GridPoint, ...]
    start: Coefficients
    provisional: tuple[Coefficients, ...]
    end: Coefficients
    first_start: Coefficients | None = None  # "first": the start of its provisional transfer (t_0)


@dataclass(frozen=True)
class PNDMPlan:
    steps: tuple[PNDMStep, ...]

    @classmethod
    def on_grid(cls, grid: TimeGrid) -> "PNDMPlan":
        """PLMS on an arbitrary grid: every transfer from a grid point to the next one."""
        n = len(grid)
        steps = []
        for i in range(n):
            here = (grid.alpha_at(i), grid.sigma_at(i))
            end = (grid.alpha_at(i + 1), grid.sigma_at(i + 1))
            if i == 0 and n >= 2:
                steps.append(PNDMStep("first", (grid.point(0), grid.point(1)), here, (end,), end, here))
            else:
                steps.append(PNDMStep("plms", (grid.point(i),), here, (), end))
        return cls(tuple(steps))

    @classmethod
    def of_scheduler(cls, scheduler, schedule) -> "PNDMPlan":
        """The plan of a PNDMScheduler after ``set_timesteps(N)``: its own times, quirks included."""
        n = int(scheduler.num_inference_steps)
        ratio = int(scheduler.config.num_train_timesteps) // n
        half = ratio // 2
        final = float(scheduler.final_alpha_cumprod)

        def coeff(t) -> Coefficients:
            t = int(t)
            if t < 0:
                return float(np.sqrt(final)), float(np.sqrt(1.0 - final))
            return float(schedule.alpha(float(t))), float(schedule.sigma(float(t)))

        def call(t) -> GridPoint:
            return GridPoint(float(int(t)), *coeff(t))

        steps = []
        prk = [int(t) for t in np.asarray(scheduler.prk_timesteps)]
        plms = [int(t) for t in np.asarray(scheduler.plms_timesteps)]
        if not scheduler.config.skip_prk_steps:  # the four highest times, three Runge–Kutta steps
            for k in range(0, len(prk), 4):
                s, c1, c2, c3 = prk[k:k + 4]
                steps.append(PNDMStep("prk", tuple(call(t) for t in (s, c1, c2, c3)), coeff(s),
                                      (coeff(s - half), coeff(c1), coeff(c2 - half)), coeff(c3)))
        elif len(plms) >= 2:  # [t_0, t_1, t_1, t_2, …]: the first step calls at t_0 and t_1
            t0, t1 = plms[0], plms[1]
            steps.append(PNDMStep("first", (call(t0), call(t1)), coeff(t1 + ratio), (coeff(t0 - ratio),),
                                  coeff(t1), coeff(t0)))
            plms = plms[2:]
        steps.extend(PNDMStep("plms", (call(t),), coeff(t), (), coeff(t - ratio)) for t in plms)
        return cls(tuple(steps))

    @property
    def times(self) -> np.ndarray:
        """The model time each step starts at (its first network call): the sampler's grid."""
        return np.array([s.calls[0].t for s in self.steps], dtype=np.float64)


def pndm_times(scheduler) -> np.ndarray:
    """The distinct model times t_0 > … of a set PNDMScheduler's steps (``timesteps`` repeats t_1)."""
    skip = bool(scheduler.config.skip_prk_steps)
    prk = [int(t) for t in np.asarray(scheduler.prk_timesteps)][::4] if not skip else []
    plms = [int(t) for t in np.asarray(scheduler.plms_timesteps)]
    if skip and len(plms) >= 2:
        plms = plms[:1] + plms[2:]
    return np.array(prk + plms, dtype=np.float64)


def transfer(x: torch.Tensor, start: Coefficients, end: Coefficients, eps: torch.Tensor) -> torch.Tensor:
    """x at ``start`` moved to ``end`` along the estimate ``eps`` (DDIM's step)."""
    (a, s), (a2, s2) = start, end
    return (a2 / a) * x + (s2 - a2 * s / a) * eps


class PNDM(Solver):
    """PLMS with the Heun-like first step (or the Runge–Kutta warm-up) as diffusers' PNDMScheduler."""

    name, order = "pndm", 4

    def __init__(self, denoiser: Denoiser, grid: TimeGrid, plan: PNDMPlan | None = None):
        super().__init__(denoiser, grid)
        if grid.coordinates != "rho":
            raise ValueError("solver='pndm' steps a VP path (PNDMScheduler's); use 'ddim', 'dpmpp2m' or 'heun' "
                             "on a flow-matching schedule")
        self.plan = plan or PNDMPlan.on_grid(grid)
        if len(self.plan.steps) != len(grid):
            raise ValueError(f"the PNDM plan has {len(self.plan.steps)} steps for a grid of {len(grid)}")
        self.keeps_v = denoiser.prediction_type == "v_prediction"

    def _estimate(self, p: GridPoint, x, cond, uncond) -> torch.Tensor:
        """What the scheduler keeps of one call: ε̂, or the network's v for a v-prediction model."""
        eps, x0 = self.denoiser.eps_and_x0(x, p, cond, uncond)
        return p.alpha * eps - p.sigma * x0 if self.keeps_v else eps

    def _eps(self, estimate, start: Coefficients, x):
        return start[0] * estimate + start[1] * x if self.keeps_v else estimate

    def _move(self, x, start, end, estimate):
        return transfer(x, start, end, self._eps(estimate, start, x))

    def step(self, i, x, hist: History, cond, uncond):
        s = self.plan.steps[i]
        if s.kind == "first":
            e0 = self._estimate(s.calls[0], x, cond, uncond)
            guess = self._move(x, s.first_start, s.provisional[0], e0)
            e1 = self._estimate(s.calls[1], guess, cond, uncond)
            return self._move(x, s.start, s.end, (e0 + e1) / 2), (e0,)
        if s.kind == "prk":
            e = [self._estimate(s.calls[0], x, cond, uncond)]
            for call, target in zip(s.calls[1:], s.provisional):
                e.append(self._estimate(call, self._move(x, s.start, target, e[-1]), cond, uncond))
            combined = e[0] / 6 + e[1] / 3 + e[2] / 3 + e[3] / 6
            return self._move(x, s.start, s.end, combined), (*hist, e[0])[-3:]
        e = self._estimate(s.calls[0], x, cond, uncond)
        kept = (*hist, e)
        weights = ADAMS_BASHFORTH[len(kept)]
        combined = sum(w * k for w, k in zip(weights, reversed(kept)))
        return self._move(x, s.start, s.end, combined), kept[-3:]


__all__ = ["PNDM", "PNDMPlan", "PNDMStep", "pndm_times", "transfer"]
