"""The public entry point: ``sample`` — solve the probability-flow ODE, differentiably.

    x_0 = sample(model, x_T, schedule=…, timesteps=… | steps=N, cond=…, uncond=…, guidance_scale=w,
                 solver="ddim" | "dpmpp2m" | "heun", grad="exact" | "adjoint" | … | None)

x_0 is connected to x_T, cond, uncond and every parameter of the model with requires_grad, through the
chosen gradient mode, so ``loss(x_0).backward()`` fills their ``.grad``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .gradients import GradMode, resolve_grad_mode
from .model import Denoiser, trainable_parameters
from .schedule import VPSchedule
from .solvers import SOLVERS, TimeGrid, make_solver
from .validation import check_sample_inputs, resolve_timesteps


def sample(
    model: Callable,
    x_T: torch.Tensor,
    *,
    schedule,
    timesteps=None,
    steps: int | None = None,
    cond: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    solver: str = "ddim",
    grad: str | GradMode | None = "exact",
    prediction_type: str | None = None,
    params: Sequence[torch.Tensor] | None = None,
    model_kwargs: dict | None = None,
) -> torch.Tensor:
    """Sample x_0 from x_T by solving the probability-flow ODE, differentiably.

    Args:
        model: a diffusers ``UNet2DConditionModel`` / ``UNet2DModel`` as it is, or a callable
            ``(x, t, cond) -> tensor``. Put it in eval mode (dropout breaks recomputation).
        x_T: the initial noise (B, C, H, W) at the first timestep.
        schedule: a :class:`VPSchedule`, or a diffusers scheduler (its ``alphas_cumprod`` and
            ``config.prediction_type`` are used).
        timesteps: model times in decreasing order (diffusers' ``scheduler.timesteps``; floats allowed).
        steps: instead of ``timesteps``, N times uniform from the schedule's t_max to t_min.
        cond, uncond: conditioning embeddings (B or 1, L, D) and the empty-prompt embedding for
            classifier-free guidance with scale ``guidance_scale`` (one batched network call).
        solver: "ddim" (Euler in ρ), "dpmpp2m" (DPM-Solver++(2M)) or "heun".
        grad: how x_0 is differentiated: "exact" (exact discrete adjoint; default), "adjoint"
            (AdjointDPM's continuous adjoint; see :class:`Adjoint` for options), "backprop",
            "checkpoint", "truncated" (see :class:`Truncated`), or None for plain sampling.
        prediction_type: "epsilon", "sample" or "v_prediction" (default: the scheduler's, else epsilon).
        params: extra tensors the model uses that should receive gradients (the model's own
            parameters with requires_grad are found automatically).
        model_kwargs: extra keyword arguments for every network call (e.g. ``added_cond_kwargs``).
    """
    if not isinstance(schedule, VPSchedule):
        if prediction_type is None:
            prediction_type = getattr(getattr(schedule, "config", None), "prediction_type", None)
        schedule = VPSchedule.from_scheduler(schedule)
    denoiser = Denoiser(model, schedule, prediction_type or "epsilon", float(guidance_scale), dict(model_kwargs or {}))
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
    mode = resolve_grad_mode(grad)
    check_sample_inputs(model, x_T, cond, uncond, float(guidance_scale), denoiser.style)
    grid = TimeGrid.from_timesteps(schedule, resolve_timesteps(schedule, timesteps, steps))
    ode_solver = make_solver(solver, denoiser, grid)
    if not denoiser.uses_guidance:
        uncond = None
    if mode is None:
        with torch.no_grad():
            x, hist = x_T, ()
            for i in range(ode_solver.num_steps):
                x, hist = ode_solver.step(i, x, hist, cond, uncond)
        return x
    x0 = mode.run(ode_solver, x_T, cond, uncond, trainable_parameters(model, list(params or [])))
    if x0.requires_grad:
        x0.register_hook(_check_incoming_gradient)
    return x0


def _check_incoming_gradient(grad: torch.Tensor) -> None:
    if not torch.isfinite(grad).all():
        raise FloatingPointError(
            "the gradient of the loss with respect to the sample contains NaN or inf; "
            "check the loss for log(0), division by zero or overflow (try float32/float64)"
        )
