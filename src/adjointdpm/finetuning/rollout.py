"""What one fine-tuning iteration samples from, and what a method reports back.

A :class:`Rollout` bundles everything :func:`adjointdpm.sample` takes for one batch: the network (its
parameters with ``requires_grad`` are the trainable ones: full weights or peft LoRA adapters), the
schedule and timesteps, the solver, the conditioning with classifier-free guidance, x_T and the injected
noises of a stochastic solver. ``reward(x_0) -> (B,)`` is a closure the application builds (decoding,
prompts, the prompts' fields) and is *maximised*.

``Rollout.sampler(network)`` asks the engine (``build_sampler``) for the rollout's sampler exactly as ``sample``
builds it (same Denoiser, grid and noise source), for the methods that step by hand (the one-step method stops at
an intermediate step; Adjoint Matching samples its own memoryless chain on the same grid).

Data parallel: a rollout may hold rows ``start … stop`` of a global batch of ``size`` samples (``rows``). The
noises a method seeds itself (:meth:`Rollout.seeded_noise`) are then drawn for the whole global batch and these
rows kept (:class:`GlobalBatchRows`), so every sample gets the injected noises it gets in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from ..engine import Sampler, build_sampler
from ..grid import TimeGrid
from ..model import Denoiser
from ..schedule import NoiseSchedule
from ..solvers import solver_name
from ..stochastic import NoiseSource, SeededNoise, is_stochastic
from .errors import MethodError

Reward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Rollout:
    """One batch to sample: ``adjointdpm.sample``'s arguments, named the same way."""

    network: Callable
    x_T: torch.Tensor
    schedule: Any  # a configured diffusers scheduler or a NoiseSchedule
    timesteps: Any
    cond: Any = None
    uncond: Any = None
    guidance_scale: float = 1.0
    solver: str = "ddim"
    eta: float = 0.0
    noise: Any = None  # the stochastic solvers' noises: seed, generator, (N, B, …) tensor or None
    prediction_type: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    rows: tuple[int, int, int] | None = None  # (start, stop, size): these rows of a global batch (data parallel)

    @property
    def num_steps(self) -> int:
        return len(self.grid())

    @property
    def stochastic(self) -> bool:
        return is_stochastic(solver_name(self.solver), float(self.eta))

    def sample_kwargs(self) -> dict:
        """Keyword arguments of ``adjointdpm.sample`` (all but the network, x_T and ``grad``)."""
        kwargs = dict(schedule=self.schedule, timesteps=self.timesteps, cond=self.cond, uncond=self.uncond,
                      guidance_scale=self.guidance_scale, solver=self.solver, prediction_type=self.prediction_type,
                      model_kwargs=self.model_kwargs)
        if self.stochastic:
            kwargs.update(eta=self.eta, noise=self.noise)
        return kwargs

    def with_noise_from(self, generator: torch.Generator) -> "Rollout":
        """This rollout, its stochastic sampler's noise seeded from ``generator`` where none was given (so a
        run is reproducible, and resumable, from the generator's state alone)."""
        if self.noise is not None or not self.stochastic:
            return self
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator).item())
        return replace(self, noise=self.seeded_noise(seed))

    def seeded_noise(self, seed: int):
        """The injected noises of ``seed`` for this rollout: the seed itself (one draw of the batch per step), or,
        for rows of a global batch, the global batch's draw restricted to these rows."""
        if self.rows is None:
            return seed
        start, stop, size = self.rows
        return GlobalBatchRows(SeededNoise(seed), start, stop, size)

    # -- the engine's pieces, as sample() builds them ---------------------------------------------
    def sampler(self, network: Callable | None = None, guidance_scale: float | None = None) -> Sampler:
        """The engine's sampler of this rollout (for ``network``, default the rollout's, and a guidance scale):
        the same Denoiser, grid and step map (with the rollout's noise source) as ``adjointdpm.sample``."""
        stochastic = self.stochastic
        scale = float(self.guidance_scale if guidance_scale is None else guidance_scale)
        return build_sampler(self.network if network is None else network, self.schedule, self.timesteps,
                             solver=self.solver, eta=self.eta, prediction_type=self.prediction_type, guidance_scale=scale,
                             model_kwargs=self.model_kwargs, noise=self.noise if stochastic else None,
                             x_T=self.x_T if stochastic else None, cond=self.cond if stochastic else None,
                             uncond=self.uncond if stochastic and scale != 1.0 else None)

    def path(self) -> NoiseSchedule:
        return self.sampler().denoiser.schedule

    def grid(self) -> TimeGrid:
        return self.sampler().grid

    def denoiser(self, network: Callable | None = None, guidance_scale: float | None = None) -> Denoiser:
        """The engine's (ε̂, x̂₀) adapter for ``network`` (default: the rollout's) and a guidance scale."""
        return self.sampler(network, guidance_scale).denoiser

    def solver_for(self, network: Callable | None = None):
        """The rollout's step map Φ_i (deterministic, or stochastic with the rollout's noise source)."""
        return self.sampler(network).solver

    def initial_state(self) -> torch.Tensor:
        """x at the first grid point (the pipeline's latents times the grid's input scale)."""
        return self.sampler().initial_state(self.x_T)

    def guided_pair(self):
        """(cond, uncond) as the step maps take them: uncond dropped without guidance."""
        return self.cond, (self.uncond if float(self.guidance_scale) != 1.0 else None)


class GlobalBatchRows(NoiseSource):
    """Rows ``start … stop`` of what ``source`` draws for a batch of ``size`` samples (a single-seed source draws
    each step for the whole batch at once, so a process's rows must be cut from the global draw)."""

    def __init__(self, source: NoiseSource, start: int, stop: int, size: int):
        if not 0 <= start < stop <= size:
            raise ValueError(f"rows {start}…{stop} do not lie in a batch of {size}")
        self.source, self.start, self.stop, self.size = source, int(start), int(stop), int(size)

    def noise_at(self, i, like):
        if like.shape[0] != self.stop - self.start:
            raise ValueError(f"a noise source of {self.stop - self.start} rows was asked for a batch of {like.shape[0]}")
        full = torch.empty((self.size, *like.shape[1:]), dtype=like.dtype, device=like.device)
        return self.source.noise_at(i, full)[self.start:self.stop]


@dataclass
class StepReport:
    """What one method's backward pass reports.

    rewards:       (B,) detached rewards of the samples the gradient was computed from (for ``onestep``:
                   of the one-step predictions x̂₀, as ReFL scores them)
    loss:          the value of the method's loss (its gradient is what was added to ``p.grad``)
    forward_calls: network evaluations (a guided call on [uncond; cond] counts once), measured
    vjp_calls:     backward passes through a network evaluation, measured
    stats:         the method's own numbers (the truncation drawn, the control norm, …)
    """

    rewards: torch.Tensor
    loss: float
    forward_calls: int
    vjp_calls: int
    stats: dict = field(default_factory=dict)

    @property
    def model_calls(self) -> int:
        """Forward and VJP network evaluations together (a VJP costs about two forwards)."""
        return self.forward_calls + self.vjp_calls


def checked_rewards(reward: Reward, x0: torch.Tensor, need_grad: bool) -> torch.Tensor:
    """``reward(x0)`` as a (B,) tensor; a wrong shape, or no gradient where one is needed, is a MethodError."""
    r = reward(x0)
    if not isinstance(r, torch.Tensor) or r.shape != (x0.shape[0],):
        shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
        raise MethodError(f"the reward must return one value per sample, shape ({x0.shape[0]},), got {shape}")
    if need_grad and not r.requires_grad:
        raise MethodError("the reward returned no gradient with respect to the sample; "
                          "compute it with differentiable torch operations (no .detach(), numpy or PIL)")
    return r
