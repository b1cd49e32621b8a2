"""The reversible baseline: EDICT coupled sampling, differentiated by inverting its steps (DOODL).

EDICT (Wallace et al. 2023) runs two coupled copies (x, y) of a DDIM chain, both starting at x_T. In the
grid's coordinates z = x/c, τ (:mod:`adjointdpm.grid`) the DDIM step from t_i to t_{i+1} is the affine map
x ↦ a_i x + b_i f(x, t_i) with f the drift dz/dτ (ε̂ for VP, ε̂ − x̂₀ = the velocity for flow matching) and

    a_i = c_{i+1}/c_i,   b_i = c_{i+1} (τ_{i+1} − τ_i)        (VP: a = α'/α, b = α'(ρ' − ρ); the last step
                                                             ends at the grid's end point, the clean sample)

where each copy's f is evaluated at the *other* copy, then the two are mixed with weight p (ε̂ below
stands for f):

    x'  = a x + b ε̂(y)          y'  = a y + b ε̂(x')
    x⁺  = p x' + (1 − p) y'      y⁺  = p y' + (1 − p) x⁺

Every line solves for its left-hand input, so the step inverts exactly (with the same two network calls):

    y'  = (y⁺ − (1 − p) x⁺)/p    x'  = (x⁺ − (1 − p) y')/p
    y   = (y' − b ε̂(x'))/a       x   = (x' − b ε̂(y))/a

The sample is the x copy at the end. The forward pass keeps only the final pair (x_N, y_N). The backward
pass walks i = N−1 … 0, and at each step the two network calls of the inversion are the two calls the
step's vector–Jacobian product needs, so they run once, with a graph, and both jobs share them:

    x̃⁺ = x̄⁺ + (1 − p) ȳ⁺,   x̄' = p x̃⁺,   ȳ' = p ȳ⁺ + (1 − p) x̃⁺
    ε̂(x') with graph:  x̄' += b ε̂ᵀ-VJP(ȳ'),  then  y = (y' − b ε̂(x'))/a
    ε̂(y)  with graph:  ȳ   = a ȳ' + b ε̂ᵀ-VJP(x̄'),  x̄ = a x̄',  then  x = (x' − b ε̂(y))/a

(each VJP also adds its conditioning and weight cotangents to their buffers), and ∂L/∂x_T = x̄_0 + ȳ_0.
This is the gradient of the EDICT sampler up to the rounding of the reconstruction: memory is O(1) in N,
cost is 2N calls forward and 2N calls with graph plus their reverse passes backward. The inversion
divides by p and by a at every step, so rounding grows along the chain: the reconstruction is accurate to
rounding in float64 and float32; half precision is not recommended. EDICT is its own sampler (its output
differs from DDIM's for the same x_T), defined on the DDIM step, so only ``solver="ddim"`` is supported.

``Reversible(backward="autograd")`` runs the same EDICT sampler under plain autograd instead (memory grows
with N): the reference the inversion is tested against. Under ``torch.no_grad()`` either is plain EDICT
sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CustomBackwardMode

SUPPORTED_SOLVERS = ("ddim",)
BACKWARDS = ("invert", "autograd")


@dataclass(frozen=True)
class Reversible(CustomBackwardMode):
    """EDICT coupled sampling (mixing weight ``p``) with gradients by step inversion (DOODL).

    p:        EDICT's mixing weight, 0 < p ≤ 1 (0.93 in the EDICT and DOODL papers).
    backward: "invert" (O(1) memory: reconstruct each state from the next) or "autograd" (plain
              back-propagation through the EDICT loop; memory grows with the number of steps).
    """

    p: float = 0.93
    backward: str = "invert"
    name = "reversible"

    def __post_init__(self):
        if not isinstance(self.p, (int, float)) or not 0.0 < float(self.p) <= 1.0:
            raise ValueError(f"Reversible(p=…) is EDICT's mixing weight and must lie in (0, 1], got {self.p!r}")
        if self.backward not in BACKWARDS:
            raise ValueError(f"unknown Reversible backward {self.backward!r}; use one of {', '.join(BACKWARDS)}")

    # -- the sampler ----------------------------------------------------------------------------
    def run(self, solver, x_T, cond, uncond, params, stand_ins=None):
        check_solver(solver)
        if self.backward == "autograd":
            x, _ = edict_sample(solver, x_T, cond, uncond, self.p)
            return x
        return super().run(solver, x_T, cond, uncond, params, stand_ins)

    def record(self, solver, x_T, cond, uncond):
        x, y = edict_sample(solver, x_T, cond, uncond, self.p)
        return x, (x, y)

    # -- the backward pass ----------------------------------------------------------------------
    def pull_back(self, solver, record, grad_x0, acc):
        x, y = record
        p, q = float(self.p), 1.0 - float(self.p)
        drift = solver.drift
        x_bar, y_bar = grad_x0, torch.zeros_like(grad_x0)
        for i in reversed(range(solver.num_steps)):
            a, b = step_coefficients(solver.grid, i)
            # undo the mixing, and pull the cotangents back through it
            y_mid = (y - q * x) / p
            x_mid = (x - q * y_mid) / p
            x_total = x_bar + q * y_bar
            x_mid_bar, y_mid_bar = p * x_total, p * y_bar + q * x_total
            # y' = a y + b ε̂(x'): one call at x', with graph
            (e_x,), (g,) = acc.vjp(lambda v, c, u: (drift(i, v, c, u),), [x_mid], [b * y_mid_bar])
            if g is not None:
                x_mid_bar = x_mid_bar + g
            y = (y_mid - b * e_x) / a
            # x' = a x + b ε̂(y): one call at the reconstructed y, with graph
            (e_y,), (g,) = acc.vjp(lambda v, c, u: (drift(i, v, c, u),), [y], [b * x_mid_bar])
            x = (x_mid - b * e_y) / a
            y_bar = a * y_mid_bar if g is None else a * y_mid_bar + g
            x_bar = a * x_mid_bar
        return x_bar + y_bar


def check_solver(solver) -> None:
    if solver.name not in SUPPORTED_SOLVERS:
        raise ValueError(
            f"grad='reversible' (EDICT) is defined on the DDIM step and supports solver='ddim' only, "
            f"got solver={solver.name!r}; use solver='ddim', or another grad mode (e.g. 'exact') for {solver.name!r}"
        )


def step_coefficients(grid, i: int) -> tuple[float, float]:
    """(a_i, b_i) of the DDIM step t_i → t_{i+1} as x ↦ a x + b f(x); the last step ends at the grid's end."""
    c, c_next = grid.scale_at(i), grid.scale_at(i + 1)
    return c_next / c, c_next * (grid.tau_at(i + 1) - grid.tau_at(i))


def edict_step(solver, i: int, x, y, cond, uncond, p: float):
    """One EDICT step (x_i, y_i) → (x_{i+1}, y_{i+1}); differentiable if its inputs are."""
    a, b = step_coefficients(solver.grid, i)
    drift = solver.drift
    x_mid = a * x + b * drift(i, y, cond, uncond)
    y_mid = a * y + b * drift(i, x_mid, cond, uncond)
    x_next = p * x_mid + (1 - p) * y_mid
    return x_next, p * y_mid + (1 - p) * x_next


def edict_invert_step(solver, i: int, x_next, y_next, cond, uncond, p: float):
    """The inverse of ``edict_step``: (x_{i+1}, y_{i+1}) → (x_i, y_i)."""
    a, b = step_coefficients(solver.grid, i)
    drift = solver.drift
    y_mid = (y_next - (1 - p) * x_next) / p
    x_mid = (x_next - (1 - p) * y_mid) / p
    y = (y_mid - b * drift(i, x_mid, cond, uncond)) / a
    return (x_mid - b * drift(i, y, cond, uncond)) / a, y


def edict_sample(solver, x_T, cond, uncond, p: float = 0.93):
    """Run the EDICT sampler from x = y = x_T; returns the final pair (x_0, y_0). The sample is x_0."""
    check_solver(solver)
    x = y = x_T
    for i in range(solver.num_steps):
        x, y = edict_step(solver, i, x, y, cond, uncond, float(p))
    return x, y
