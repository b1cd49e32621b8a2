"""Baseline gradient modes built on plain autograd (for comparison; same API).

* ``Backprop``   autograd through the whole step loop: exact, memory grows with the number of steps.
* ``Checkpoint`` ``torch.utils.checkpoint`` around each step (what DNO/AlignProp do): exact, stores the N
  step inputs and recomputes each step's activations in the backward pass.
* ``Truncated(k)`` the gradient flows through the last k steps only (DRaFT-K / AlignProp). The conditioning
  and the weights see those k steps. x_T reaches the last k steps by a straight-through estimate in the
  grid's coordinates z = x/c: ∂x_{N−k}/∂x_T ≈ (c_{N−k}/c_0) I, the Jacobian of the ODE's flow when the
  drift does not depend on x (c = α for VP, 1 for flow matching).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .base import GradMode


@dataclass(frozen=True)
class Backprop(GradMode):
    name = "backprop"

    def run(self, solver, x_T, cond, uncond, params):
        x0, _ = solver.run(x_T, (), cond, uncond)
        return x0


@dataclass(frozen=True)
class Checkpoint(GradMode):
    name = "checkpoint"

    def run(self, solver, x_T, cond, uncond, params):
        def checkpointed_step(i, x, hist, cond, uncond):
            def flat_step(x, *hist):
                x_next, hist_next = solver.step(i, x, hist, cond, uncond)
                return (x_next, *hist_next)

            out = checkpoint(flat_step, x, *hist, use_reentrant=False)
            return out[0], tuple(out[1:])

        x0, _ = solver.run(x_T, (), cond, uncond, step=checkpointed_step)
        return x0


@dataclass(frozen=True)
class Truncated(GradMode):
    k: int = 1
    name = "truncated"

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"Truncated(k) needs an integer k ≥ 1 (the number of steps to back-propagate), got {self.k!r}")

    def run(self, solver, x_T, cond, uncond, params):
        n = solver.num_steps
        start = max(0, n - self.k)
        with torch.no_grad():
            x, hist = solver.run(x_T, (), cond, uncond, stop=start)
        if start > 0:
            scale = solver.grid.scale_at(start) / solver.grid.scale_at(0)
            x = x + scale * (x_T - x_T.detach())
        x0, _ = solver.run(x, hist, cond, uncond, start=start)
        return x0
