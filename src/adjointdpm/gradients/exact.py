"""The exact discrete adjoint: the gradient of the sampler as the map it is.

The sampler is a composition of step maps (x_{i+1}, h_{i+1}) = Φ_i(x_i, h_i; c, θ). The forward pass runs
without a graph and stores the N step inputs (x_i, h_i). The backward pass walks i = N−1 … 0 with the
cotangents (x̄_{i+1}, h̄_{i+1}), recomputes Φ_i with a graph and pulls them back:

    (x̄_i, h̄_i) = (x̄_{i+1}, h̄_{i+1})ᵀ ∂Φ_i/∂(x_i, h_i),   c̄ += (…)ᵀ ∂Φ_i/∂c,   θ̄ += (…)ᵀ ∂Φ_i/∂θ.

By the chain rule this equals back-propagation through the loop, to rounding, while memory holds the
stored step inputs (N latents, 2N for the multistep solver) plus one step's activations.

With a memory budget (``Exact(memory=B)``) the forward pass keeps the autograd graph of the last steps
whose graphs fit in B (see ``memory_budget.py`` for the rule) and the backward pass replays them instead of
recomputing them (``kept_steps.py``): the same operations in the same order, so the same gradient, and
with ``memory=float("inf")`` the cost of back-propagation (one forward with graph + one backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import CustomBackwardMode, check_step_cotangent
from .memory_budget import SavedActivations, network_calls, parse_memory, steps_to_keep
from .kept_steps import GraphLeaves, StepGraph


@dataclass(frozen=True)
class Exact(CustomBackwardMode):
    """The exact gradient of the discrete sampler.

    Args:
        memory: how much memory the autograd graphs kept from the forward pass may take: bytes (int or
            float), a string such as "8GiB" or "512MiB", ``float("inf")`` (keep every step: the time of
            back-propagation), or None / 0 (keep none: store the N step inputs and recompute every step,
            memory flat in N). The gradient is the same in every setting. Which steps are kept: all steps
            cost the same per network call, so the graph of step 0 is measured (its saved activations,
            weights not counted) and the longest run of final steps whose graphs fit is kept; the
            backward pass consumes those first. Peak memory ≈ budget + N latents + one step's activations.
    """

    memory: int | float | str | None = None
    name = "exact"

    def __post_init__(self):
        parse_memory(self.memory)  # a bad size fails here, when the mode is made

    @property
    def budget_bytes(self) -> float:
        return parse_memory(self.memory) or 0.0

    def record(self, solver, x_T, cond, uncond):
        n, budget = solver.num_steps, self.budget_bytes
        x, hist, record = x_T, (), []
        if budget <= 0:
            def recorded_step(i, x, hist, cond, uncond):
                record.append((x, hist))
                return solver.step(i, x, hist, cond, uncond)

            x, _ = solver.run(x, hist, cond, uncond, step=recorded_step)
            return x, record
        leaves = GraphLeaves(cond, uncond)
        keep_from = 0 if math.isinf(budget) else None
        for i in range(n):
            if keep_from is None:  # step 0: build its graph to measure it, keep it only if every step fits
                with SavedActivations() as saved:
                    graph = StepGraph(solver, i, x, hist, leaves)
                calls = [network_calls(solver, j) for j in range(n)]
                keep_from = steps_to_keep(calls, saved.bytes / calls[0], budget)
                record.append(graph if keep_from == 0 else (x, hist))
                x, hist = graph.detached_outputs()
                del graph
            elif i >= keep_from:
                graph = StepGraph(solver, i, x, hist, leaves)
                record.append(graph)
                x, hist = graph.detached_outputs()
            else:
                record.append((x, hist))
                x, hist = solver.step(i, x, hist, cond, uncond)
        return x, record

    def pull_back(self, solver, record, grad_x0, acc):
        x_bar, hist_bar = grad_x0, ()
        for i in reversed(range(solver.num_steps)):
            entry = record[i]
            record[i] = None  # the state (or graph) is no longer needed once its step is pulled back
            if isinstance(entry, StepGraph):
                entry.params = acc.params
                primals, step = entry.inputs, entry.replay
            else:
                x_i, hist_i = entry
                primals = [x_i, *hist_i]

                def step(x, *rest, i=i, n_hist=len(hist_i)):
                    hist, (cond, uncond) = tuple(rest[:n_hist]), rest[n_hist:]
                    x_next, hist_next = solver.step(i, x, hist, cond, uncond)
                    return (x_next, *hist_next)

            cotangents = [x_bar, *hist_bar]
            _, (x_bar, *hist_bar) = acc.vjp(step, primals, cotangents)
            del entry, step
            if x_bar is None:
                x_bar = grad_x0.new_zeros(primals[0].shape)
            check_step_cotangent(x_bar, i, solver.grid.t[i])
        return x_bar
