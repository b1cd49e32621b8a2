"""The KL anchor of the methods that differentiate the reward through the sampler (option ``kl=β``).

    loss = −mean_b r(x_0^b) + β · A,
    A = mean over S grid points i (drawn per iteration) and the batch of
        mean_elements ‖ε̂_θ(x_i, t_i, c) − ε̂_base(x_i, t_i, c)‖²,    x_i = α_i · sg(x_0) + σ_i · ξ,

with x_0 the batch the reward scored (detached), ξ fresh unit noise, α_i, σ_i the sampler's grid, c the
prompt's conditioning without guidance, ε̂_base the base model (adapters switched off, or a frozen copy of the
original weights) and ε̂_θ the only term with a graph.

Why this term: for a stochastic sampler the KL divergence between the fine-tuned and the base model's path
measures is E ∫ g(t)²/(2σ(t)²) ‖ε̂_θ − ε̂_base‖² dt along the fine-tuned model's paths (Girsanov), it bounds
the KL divergence of the final images from above, and the maximiser of E r − β·KL(p_θ ‖ p_base) is
p_base·e^{r/β}: the
anchor is what keeps reward fine-tuning on the base model's distribution rather than on the reward's mode
(diversity). A is a proxy of that integral: uniform weights over the grid, and states re-noised from the
samples (the fine-tuned model's own marginals when its forward and reverse processes agree) instead of the
sampler's trajectory, which the engine's memory-flat gradients do not keep. It costs S forwards of each model
and S reverse passes per iteration. Under data parallelism ξ is drawn for the global batch and cut to this
process's rows, so the result does not depend on how rows are split.
"""

from __future__ import annotations

import math

import torch

from .base_model import BaseModel
from .errors import MethodError
from .rollout import Rollout

#: grid points per iteration at which the anchor compares the two models unless ``kl_steps`` says otherwise
DEFAULT_ANCHOR_STEPS = 2


def check_kl(kl, kl_steps, method: str) -> tuple[float, int]:
    if isinstance(kl, bool) or not isinstance(kl, (int, float)) or not math.isfinite(kl) or kl < 0:
        raise MethodError(f"{method}: kl (the weight of the KL anchor) must be a number ≥ 0, got {kl!r}")
    if isinstance(kl_steps, bool) or not isinstance(kl_steps, int) or kl_steps < 1:
        raise MethodError(f"{method}: kl_steps (grid points per iteration) must be an integer ≥ 1, got {kl_steps!r}")
    return float(kl), kl_steps


class KLAnchor:
    """β · A of the module docstring; ``prepare`` records the base model before the first update."""

    def __init__(self, weight: float, steps: int):
        self.weight, self.steps = float(weight), int(steps)
        self.base: BaseModel | None = None

    def prepare(self, network, base=None) -> None:
        self.base = BaseModel(network, base)

    def networks(self) -> list:
        """The networks the anchor calls (for counting calls): the frozen copy, where there is one."""
        return [] if self.base is None or self.base.frozen is None else [self.base.frozen]

    def draw(self, rollout: Rollout, x0: torch.Tensor, generator: torch.Generator) -> tuple[list[int], torch.Tensor]:
        """The grid points i (sorted, distinct) and the noises ξ (S, B, …) for this process's rows."""
        n = rollout.num_steps
        points = sorted(int(i) for i in torch.randperm(n, generator=generator)[: min(self.steps, n)])
        start, stop, size = rollout.rows if rollout.rows is not None else (0, x0.shape[0], x0.shape[0])
        xi = torch.randn((len(points), size, *x0.shape[1:]), generator=generator, dtype=torch.float64)
        return points, xi[:, start:stop].to(dtype=x0.dtype, device=x0.device)

    def penalty(self, rollout: Rollout, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A (a scalar whose graph reaches the trainable parameters only through ε̂_θ)."""
        if self.base is None:
            raise MethodError("the KL anchor needs its base model: call method.prepare(network) before the first update")
        points, xi = self.draw(rollout, x0, generator)
        grid = rollout.grid()
        x0 = x0.detach()
        states = [grid.alpha_at(i) * x0 + grid.sigma_at(i) * xi[j] for j, i in enumerate(points)]
        with torch.no_grad(), self.base() as base_net:
            base = rollout.denoiser(base_net, guidance_scale=1.0)
            targets = [base.eps(x, grid.point(i), rollout.cond) for x, i in zip(states, points)]
        current = rollout.denoiser(guidance_scale=1.0)
        with torch.enable_grad():
            terms = [(current.eps(x, grid.point(i), rollout.cond) - target).pow(2).mean()
                     for x, i, target in zip(states, points, targets)]
            return torch.stack(terms).mean()
