"""The engine assembled once: a network, a noise path and a grid of model times become a sampler.

    sampler = build_sampler(model, schedule, timesteps, solver="dpmpp2m", guidance_scale=w, …)
    x_N, _ = sampler.run(sampler.initial_state(x_T), cond, uncond)        # the plain step loop
    x_0 = sampler.sample(x_T, cond, uncond)                                # differentiably, through sampler.mode

A :class:`Sampler` holds the three engine objects every caller needs and that are built here only:

* the :class:`~adjointdpm.model.Denoiser` — the network as (ε̂, x̂₀)(x, t) of the path, with guidance;
* the :class:`~adjointdpm.grid.TimeGrid` — the model times t_0 > … > t_{N−1}, their (α, σ), the end point;
* the solver — the step maps (x_{i+1}, h_{i+1}) = Φ_i(x_i, h_i; c, θ) (deterministic, or stochastic with
  its injected noises z_i), whose loop ``Solver.run`` is the one step loop of the package;

plus the gradient mode that differentiates x_0 = Φ_{N−1} ∘ … ∘ Φ_0 (x_T) (:mod:`adjointdpm.gradients`).
:func:`adjointdpm.sample` is ``build_sampler(…).sample(…)``; applications that need the pieces (the
state after k steps, the grid from step s, the step-i x̂₀ of the one-step baseline) build a sampler too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .conditioning import Tree
from .gradients import Adjoint, GradMode, Reversible, resolve_grad_mode
from .gradients.base import CustomBackwardMode
from .grid import TimeGrid, grid_from_scheduler, pndm_grid_times, prediction_type_of, schedule_from_scheduler
from .model import Denoiser, trainable_parameters
from .schedule import NoiseSchedule
from .solvers import Solver, make_solver, solver_name
from .twins import twin_solver
from .stochastic import check_deterministic_scheduler, is_stochastic, make_stochastic_solver, resolve_noise
from .validation import check_eta, check_noise_unused, check_sample_inputs, resolve_timesteps


def time_grid(schedule, timesteps=None, *, steps: int | None = None) -> TimeGrid:
    """The grid a sampler steps through: ``schedule`` a :class:`NoiseSchedule` or a configured diffusers
    scheduler, ``timesteps`` its model times in decreasing order (or ``steps``: N of them, the scheduler's
    own ``set_timesteps(N)`` grid, set on a copy, or N uniform times of a :class:`NoiseSchedule`)."""
    return _grid_and_scheduler(*_path_and_scheduler(schedule), timesteps, steps)[0]


@dataclass
class Sampler:
    """Denoiser + grid + solver (+ the gradient mode): the sampler x_T ↦ x_0 as the engine runs it.

    Built by :func:`build_sampler`. ``noises`` / ``read``: a stochastic solver's injected noise tensors as
    given and as the solver reads them (leaf copies for the modes with their own backward pass).
    """

    model: Callable
    denoiser: Denoiser
    grid: TimeGrid
    solver: Solver
    mode: GradMode | None = None
    stochastic: bool = False
    noises: list = field(default_factory=list)
    read: list = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return self.solver.num_steps

    @property
    def uses_guidance(self) -> bool:
        return self.denoiser.uses_guidance

    def guided(self, uncond: Tree) -> Tree:
        """``uncond`` where classifier-free guidance uses it, else None (the network then runs once)."""
        return uncond if self.denoiser.uses_guidance else None

    def initial_state(self, x_T: torch.Tensor) -> torch.Tensor:
        """The state x_0 of the path from the pipeline's ``latents=`` (see ``TimeGrid.input_scale``)."""
        return self.grid.input_scale * x_T if self.grid.input_scale != 1.0 else x_T

    def run(self, x: torch.Tensor, cond: Tree = None, uncond: Tree = None, *, hist=(), start: int = 0,
            stop: int | None = None) -> tuple[torch.Tensor, tuple]:
        """The plain step loop from state (x, hist) at step ``start`` to step ``stop`` (default N), under the
        caller's autograd state; returns (x_stop, h_stop). ``uncond`` is dropped without guidance."""
        return self.solver.run(x, hist, cond, self.guided(uncond), start, stop)

    @torch.no_grad()
    def advance(self, x_T: torch.Tensor, cond: Tree = None, uncond: Tree = None, steps: int | None = None):
        """The state after the first ``steps`` steps (default all) from the pipeline's ``latents=`` x_T, no graph."""
        x, _ = self.run(self.initial_state(x_T), cond, uncond, stop=steps)
        return x

    @torch.no_grad()
    def trajectory(self, x_T: torch.Tensor, cond: Tree = None, uncond: Tree = None) -> list[torch.Tensor]:
        """The states x_0 … x_N (x_N the sample) from the pipeline's ``latents=`` x_T, no graph."""
        states = []

        def recorded_step(i, x, hist, cond, uncond):
            states.append(x)
            return self.solver.step(i, x, hist, cond, uncond)

        x, _ = self.solver.run(self.initial_state(x_T), (), cond, self.guided(uncond), step=recorded_step)
        return states + [x]

    def predict(self, i: int, x: torch.Tensor, cond: Tree = None, uncond: Tree = None):
        """(ε̂, x̂₀) of the (guided) network at grid point i and state x (with a graph where autograd records)."""
        return self.solver.predict(i, x, cond, self.guided(uncond))

    def sample(self, x_T: torch.Tensor, cond: Tree = None, uncond: Tree = None,
               params: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """x_0 from the pipeline's ``latents=`` x_T, differentiated by ``mode`` (None: no graph); see
        :func:`adjointdpm.sample` for ``params``."""
        uncond = self.guided(uncond)
        x_T = self.initial_state(x_T)
        if self.mode is None:
            with torch.no_grad():
                x, _ = self.solver.run(x_T, (), cond, uncond)
            return x
        weights = trainable_parameters(self.model, [p for p in params or [] if all(p is not n for n in self.noises)])
        pairs = [(given, used) for given, used in zip(self.noises, self.read) if given.requires_grad]
        noises, read = [given for given, _ in pairs], [used for _, used in pairs]
        if isinstance(self.mode, CustomBackwardMode):
            x0 = self.mode.run(self.solver, x_T, cond, uncond, weights + noises, stand_ins=weights + read)
        else:
            x0 = self.mode.run(self.solver, x_T, cond, uncond, weights + noises)
        if x0.requires_grad:
            x0.register_hook(_check_incoming_gradient)
        return x0


def build_sampler(
    model: Callable,
    schedule,
    timesteps=None,
    *,
    steps: int | None = None,
    solver: str | None = None,
    eta: float = 0.0,
    grad: str | GradMode | None = None,
    prediction_type: str | None = None,
    guidance_scale: float = 1.0,
    model_kwargs: dict | None = None,
    classifier: Callable | None = None,
    classifier_scale: float = 1.0,
    noise=None,
    x_T: torch.Tensor | None = None,
    cond: Tree = None,
    uncond: Tree = None,
) -> Sampler:
    """The one place where the Denoiser, the grid and the solver are built (arguments as :func:`adjointdpm.sample`).

    ``x_T``, ``cond``, ``uncond``: the inputs the sampler will run on, checked against the network when
    ``x_T`` is given (and needed then for a stochastic solver's noises: their shapes and per-sample seeds).
    Without ``x_T`` only a deterministic solver can be built. ``solver=None``: the scheduler's twin
    (:func:`adjointdpm.twins.twin_solver`; one error for a class without one), "ddim" for a NoiseSchedule.
    """
    path, scheduler = _path_and_scheduler(schedule)
    if solver is None:
        solver = "ddim" if scheduler is None else twin_solver(scheduler)
    if scheduler is not None and prediction_type is None:
        prediction_type = prediction_type_of(scheduler)
    denoiser = Denoiser(model, path, prediction_type or "epsilon", float(guidance_scale), dict(model_kwargs or {}),
                        classifier, float(classifier_scale))
    solver = solver_name(solver)
    eta = check_eta(eta, solver)
    stochastic = is_stochastic(solver, eta)
    mode = resolve_grad_mode(grad)
    if stochastic and isinstance(mode, (Adjoint, Reversible)):
        raise ValueError(
            f"grad={mode.name!r} differentiates deterministic samplers only; solver={solver!r}"
            f"{' with eta > 0' if solver == 'ddim' else ''} injects noise: use grad='exact', 'backprop', "
            "'checkpoint' or 'truncated'"
        )
    if not stochastic:
        check_noise_unused(noise, solver)
    if x_T is not None:
        check_sample_inputs(model, x_T, cond, uncond, float(guidance_scale), denoiser.style)
    elif stochastic:
        raise ValueError(f"solver={solver!r}{' with eta > 0' if solver == 'ddim' else ''} injects noise: "
                         "build its sampler with x_T=… (the shape of its noises)")
    grid, scheduler = _grid_and_scheduler(path, scheduler, timesteps, steps)
    noises, read = [], []  # the noise tensors given, and those the solver reads
    if stochastic:
        source = resolve_noise(noise, len(grid), x_T)
        noises = list(source.tensors)
        if isinstance(mode, CustomBackwardMode):
            source = source.with_leaf_tensors()  # its backward accumulates into leaves (see CustomBackwardMode.run)
        read = list(source.tensors)
        ode_solver = make_stochastic_solver(solver, denoiser, grid, source, scheduler, eta)
    else:
        check_deterministic_scheduler(scheduler, solver)
        ode_solver = make_solver(solver, denoiser, grid, scheduler)
    return Sampler(model, denoiser, grid, ode_solver, mode, stochastic, noises, read)


def _path_and_scheduler(schedule) -> tuple[NoiseSchedule, object]:
    """(the continuous path, the diffusers scheduler or None) of ``schedule=``."""
    if isinstance(schedule, NoiseSchedule):
        return schedule, None
    return schedule_from_scheduler(schedule), schedule


def _grid_and_scheduler(path: NoiseSchedule, scheduler, timesteps, steps) -> tuple[TimeGrid, object]:
    """The grid, and the scheduler it was read from (a copy set to ``steps`` steps where asked)."""
    if scheduler is None:
        return TimeGrid.from_timesteps(path, resolve_timesteps(path, timesteps, steps)), None
    if timesteps is None and steps is not None:
        scheduler, timesteps = _scheduler_timesteps(scheduler, steps)
        steps = None
    if type(scheduler).__name__ == "PNDMScheduler" and timesteps is not None:
        given, timesteps = timesteps, pndm_grid_times(scheduler, timesteps)
        listed = np.asarray(torch.as_tensor(given, dtype=torch.float64).cpu())
        if timesteps is given and listed.ndim == 1 and listed.size > 1 and not np.all(np.diff(listed) < 0):
            raise ValueError(
                "these timesteps repeat a time, as a PNDMScheduler lists them, but they are not this scheduler's "
                "own grid: call scheduler.set_timesteps(N) on the scheduler you pass and give "
                "timesteps=scheduler.timesteps (or steps=N)"
            )
    return grid_from_scheduler(scheduler, path, resolve_timesteps(path, timesteps, steps)), scheduler


def _scheduler_timesteps(scheduler, steps):
    """The scheduler's own grid for ``steps`` steps, set on a copy (the caller's scheduler is untouched)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer ≥ 1, got {steps!r}")
    if getattr(scheduler.config, "use_dynamic_shifting", False):
        raise ValueError(
            f"{type(scheduler).__name__} uses dynamic shifting, so its grid depends on the image size: call "
            "scheduler.set_timesteps(N, mu=…) as the pipeline does and pass timesteps=scheduler.timesteps"
        )
    own = copy.deepcopy(scheduler)
    own.set_timesteps(steps)
    return own, own.timesteps


def _check_incoming_gradient(grad: torch.Tensor) -> None:
    if not torch.isfinite(grad).all():
        raise FloatingPointError(
            "the gradient of the loss with respect to the sample contains NaN or inf; "
            "check the loss for log(0), division by zero or overflow (try float32/float64)"
        )


__all__ = ["Sampler", "build_sampler", "time_grid"]
