"""The exact discrete adjoint: the gradient of the sampler as the map it is.

The sampler is a composition of step maps (x_{i+1}, h_{i+1}) = Φ_i(x_i, h_i; c, θ). The forward pass runs
without a graph and stores the N step inputs (x_i, h_i). The backward pass walks i = N−1 … 0 with the
cotangents (x̄_{i+1}, h̄_{i+1}), recomputes Φ_i with a graph and pulls them back:

    (x̄_i, h̄_i) = (x̄_{i+1}, h̄_{i+1})ᵀ ∂Φ_i/∂(x_i, h_i),   c̄ += (…)ᵀ ∂Φ_i/∂c,   θ̄ += (…)ᵀ ∂Φ_i/∂θ.

By the chain rule this equals back-propagation through the loop, to rounding, while memory holds the
stored step inputs (N latents, 2N for the multistep solver) plus one step's activations.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import CustomBackwardMode, check_step_cotangent


@dataclass(frozen=True)
class Exact(CustomBackwardMode):
    name = "exact"

    def record(self, solver, x_T, cond, uncond):
        x, hist, inputs = x_T, (), []
        for i in range(solver.num_steps):
            inputs.append((x, hist))
            x, hist = solver.step(i, x, hist, cond, uncond)
        return x, inputs

    def pull_back(self, solver, record, grad_x0, acc):
        x_bar, hist_bar = grad_x0, ()
        for i in reversed(range(solver.num_steps)):
            x_i, hist_i = record[i]
            record[i] = None  # the state is no longer needed once its step is pulled back

            def step(x, *rest, i=i, n_hist=len(hist_i)):
                hist, (cond, uncond) = tuple(rest[:n_hist]), rest[n_hist:]
                x_next, hist_next = solver.step(i, x, hist, cond, uncond)
                return (x_next, *hist_next)

            cotangents = [x_bar, *hist_bar]
            _, (x_bar, *hist_bar) = acc.vjp(step, [x_i, *hist_i], cotangents)
            if x_bar is None:
                x_bar = grad_x0.new_zeros(x_i.shape)
            check_step_cotangent(x_bar, i, solver.grid.t[i])
        return x_bar
