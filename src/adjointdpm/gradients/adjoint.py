"""The continuous adjoint of AdjointDPM, in the exponential-integrator coordinates of the sampler.

In the grid's coordinates (z, τ) (:mod:`adjointdpm.grid`: y = x/α against ρ = σ/α for VP, u = x against
κ = σ for flow matching) the probability-flow ODE is dz/dτ = f(z, τ) (ε̂, resp. ε̂ − x̂₀, at x = c(τ) z).
Below "y, ρ" stand for z, τ. For a loss on y(ρ_end) the adjoint a = ∂L/∂y and the parameter adjoints
solve, backwards from ρ_end up to ρ_start,

    da/dρ = −aᵀ ∂f/∂y,     da_c/dρ = −aᵀ ∂f/∂c,     da_θ/dρ = −aᵀ ∂f/∂θ,

with a(ρ_end) = ∂L/∂y(ρ_end), a_c = a_θ = 0 there; then ∂L/∂y(ρ_start) = a, ∂L/∂c = a_c, ∂L/∂θ = a_θ.
Like the sampling ODE, this system has no stiff linear part in these coordinates, so plain steps in τ
are the exponential integrator (Euler in τ is DDIM's adjoint).

The ODE covers t_0 … t_{N−1}; the sampler's final jump to σ = 0, x_0 = x̂₀(x_{N−1}, t_{N−1}), is a single
map and is differentiated exactly. The backward grid is the forward one, or a coarser subset of it
(``steps``). The state y on the way back is either integrated backwards alongside the adjoint
(``state="backsolve"``: O(1) memory in the number of steps, the paper's claim) or reset to the stored
forward states (``state="stored"``, what ``torchdiffeq.odeint_adjoint`` does).

Backward solvers, over a step ρ_j → ρ_{j+1} (H = ρ_{j+1} − ρ_j > 0), with F = (f, −aᵀ∂f/∂(y, c, θ)):

    euler      u_{j+1} = u_j + H F_j
    heun       ũ = u_j + H F_j,  u_{j+1} = u_j + H/2 (F_j + F(ũ, ρ_{j+1}))
    multistep  VP (ρ): F linear in λ through F_{j−1}, F_j, integrated exactly against dρ = −e^{−λ} dλ:
               u_{j+1} = u_j + (H + C_j) F_j − C_j F_{j−1},  C_j = ρ_j ((1 − h) e^{h} − 1)/(λ_j − λ_{j−1}),
               h = λ_j − λ_{j+1}   (first order at the first step), the exponential multistep
               method of DPM-Solver applied to the adjoint system. Flow (κ): F linear in κ, i.e.
               variable-step Adams–Bashforth 2, C_j = H²/(2 H_{j−1}).

Weight cotangents never form an ODE state: each evaluation's −aᵀ∂f/∂θ is pulled back once, scaled by
the total weight the solver gives that evaluation (for the multistep method, its own step's weight plus
the next step's), straight into the parameters' gradient buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._vjp import accumulation_dtype
from .base import CustomBackwardMode, check_step_cotangent

ADJOINT_SOLVERS = ("euler", "heun", "multistep")
ADJOINT_STATES = ("backsolve", "stored")
DEFAULT_ADJOINT_SOLVER = {"ddim": "euler", "dpmpp2m": "multistep", "heun": "heun"}
#: below this |total weight| / |own weight| the multistep adjoint pulls weight cotangents back separately
SINGLE_PASS_MIN_WEIGHT = 0.1


@dataclass(frozen=True)
class Adjoint(CustomBackwardMode):
    """The continuous adjoint (AdjointDPM).

    state:  "backsolve" (reconstruct y backwards, O(1) memory) or "stored" (reset y to the forward states).
    steps:  number of backward steps (≤ the forward ODE steps; None = the forward grid).
    solver: "euler", "heun" or "multistep"; None picks the one matching the forward solver's order.
    """

    state: str = "backsolve"
    steps: int | None = None
    solver: str | None = None
    name = "adjoint"

    def __post_init__(self):
        if self.state not in ADJOINT_STATES:
            raise ValueError(f"unknown adjoint state {self.state!r}; use one of {', '.join(ADJOINT_STATES)}")
        if self.solver is not None and self.solver not in ADJOINT_SOLVERS:
            raise ValueError(f"unknown adjoint solver {self.solver!r}; use one of {', '.join(ADJOINT_SOLVERS)}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"Adjoint(steps=…) must be a positive integer or None, got {self.steps!r}")

    # -- grid ---------------------------------------------------------------------------------
    def backward_indices(self, num_steps: int) -> np.ndarray:
        """Indices of the forward grid visited backwards, from t_{N−1} (smallest ρ) to t_0."""
        last = num_steps - 1
        if last == 0:
            return np.array([0])
        m = last if self.steps is None else min(self.steps, last)
        return np.unique(np.round(np.linspace(0, last, m + 1)).astype(int))[::-1]

    # -- forward ------------------------------------------------------------------------------
    def record(self, solver, x_T, cond, uncond):
        keep = set(self.backward_indices(solver.num_steps).tolist()) if self.state == "stored" else set()
        keep.add(solver.num_steps - 1)
        states = {}

        def recorded_step(i, x, hist, cond, uncond):
            if i in keep:
                states[i] = x
            return solver.step(i, x, hist, cond, uncond)

        x, _ = solver.run(x_T, (), cond, uncond, step=recorded_step)
        return x, states

    # -- backward -----------------------------------------------------------------------------
    def pull_back(self, solver, states, grad_x0, acc):
        grid, last = solver.grid, solver.num_steps - 1
        # The final jump x_0 = x̂₀(x_{N−1}) is one map: pull back through it exactly.
        _, (x_bar,) = acc.vjp(
            lambda x, cond, uncond: (solver.step(last, x, (), cond, uncond)[0],), [states[last]], [grad_x0]
        )
        # ∂L/∂y = c ∂L/∂x, carried in float32 at least (half-precision models accumulate it widely)
        a = _or_zeros(x_bar, grad_x0).to(accumulation_dtype(grad_x0.dtype)) * grid.scale_at(last)
        check_step_cotangent(a, last, grid.t[last])
        y = states[last] / grid.scale_at(last)
        idx = self.backward_indices(solver.num_steps)
        if idx.size > 1:
            method = self.solver or DEFAULT_ADJOINT_SOLVER.get(solver.name, "euler")
            integrate = {"euler": self._euler, "heun": self._heun, "multistep": self._multistep}[method]
            a = integrate(solver, idx, y, a, states, acc)
        return (a / grid.scale_at(0)).to(grad_x0.dtype)

    def _drift_vjp(self, solver, k, y, a, weight, acc, target_weight=None):
        """f(y, ρ_k) and weight·(−aᵀ ∂f/∂y); adds weight·(−aᵀ ∂f/∂(c, θ)) to the buffers
        (target_weight·(−aᵀ ∂f/∂(c, θ)) instead, if given)."""
        scale = solver.grid.scale_at(k)
        (f,), (y_bar,) = acc.vjp(
            lambda y, cond, uncond: (solver.drift(k, scale * y, cond, uncond),), [y], [-weight * a], target_weight
        )
        return f, _or_zeros(y_bar, a)

    def _stored_y(self, solver, states, k):
        return states[k] / solver.grid.scale_at(k)

    def _euler(self, solver, idx, y, a, states, acc):
        tau = solver.grid.tau_at
        for k, k_next in zip(idx[:-1], idx[1:]):
            step = tau(k_next) - tau(k)
            f, da = self._drift_vjp(solver, k, y, a, step, acc)
            a = a + da
            check_step_cotangent(a, k, solver.grid.t[k])
            y = self._stored_y(solver, states, k_next) if self.state == "stored" else y + step * f
        return a

    def _heun(self, solver, idx, y, a, states, acc):
        tau = solver.grid.tau_at
        for k, k_next in zip(idx[:-1], idx[1:]):
            step = tau(k_next) - tau(k)
            f1, da1 = self._drift_vjp(solver, k, y, a, step / 2, acc)
            y_pred = self._stored_y(solver, states, k_next) if self.state == "stored" else y + step * f1
            f2, da2 = self._drift_vjp(solver, k_next, y_pred, a + 2 * da1, step / 2, acc)
            a = a + da1 + da2
            check_step_cotangent(a, k, solver.grid.t[k])
            y = y_pred if self.state == "stored" else y + step / 2 * (f1 + f2)
        return a

    def _multistep(self, solver, idx, y, a, states, acc):
        grid = solver.grid
        tau = np.array([grid.tau_at(k) for k in idx])
        own, prev = (_multistep_coefficients(tau, grid.lam[idx]) if grid.coordinates == "rho"
                     else _adams_bashforth_coefficients(tau))
        f_prev = da_prev = None
        for j, (k, k_next) in enumerate(zip(idx[:-1], idx[1:])):
            # F_j enters this step with weight own[j] and the next one with prev[j+1]: pull the weight
            # cotangents back once with the total, then recover the unit-weight state cotangent. Where the
            # total is near zero (step sizes growing fast), the weights get a second reverse pass instead.
            total = own[j] + (prev[j + 1] if j + 1 < len(prev) else 0.0)
            if abs(total) >= SINGLE_PASS_MIN_WEIGHT * abs(own[j]):
                f, da_total = self._drift_vjp(solver, k, y, a, total, acc)
                da = da_total / total
            else:
                f, da = self._drift_vjp(solver, k, y, a, 1.0, acc, target_weight=total)
            if j == 0:
                a_next, y_next = a + own[j] * da, y + own[j] * f
            else:
                a_next = a + own[j] * da + prev[j] * da_prev
                y_next = y + own[j] * f + prev[j] * f_prev
            a, f_prev, da_prev = a_next, f, da
            check_step_cotangent(a, k, solver.grid.t[k])
            y = self._stored_y(solver, states, k_next) if self.state == "stored" else y_next
        return a


def _multistep_coefficients(rho: np.ndarray, lam: np.ndarray) -> tuple[list[float], list[float]]:
    """Weights (own_j, prev_j) of F_j and F_{j−1} in step j of the exponential multistep method."""
    own, prev = [], []
    for j in range(rho.size - 1):
        step = rho[j + 1] - rho[j]
        if j == 0:
            own.append(float(step))
            prev.append(0.0)
            continue
        h = lam[j] - lam[j + 1]
        c = rho[j] * ((1 - h) * np.exp(h) - 1) / (lam[j] - lam[j - 1])
        own.append(float(step + c))
        prev.append(float(-c))
    return own, prev


def _adams_bashforth_coefficients(tau: np.ndarray) -> tuple[list[float], list[float]]:
    """Weights (own_j, prev_j) of F_j and F_{j−1} in step j of variable-step AB2 in τ (F linear in τ)."""
    own, prev = [], []
    for j in range(tau.size - 1):
        step = tau[j + 1] - tau[j]
        c = 0.0 if j == 0 else step * step / (2 * (tau[j] - tau[j - 1]))
        own.append(float(step + c))
        prev.append(float(-c))
    return own, prev


def _or_zeros(t, like):
    return like.new_zeros(like.shape) if t is None else t
