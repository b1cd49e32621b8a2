"""The public entry point: ``sample`` — solve the probability-flow ODE, differentiably.

    x_0 = sample(model, x_T, schedule=scheduler, timesteps=scheduler.timesteps, cond=…, uncond=…,
                 guidance_scale=w, solver="ddim" | "dpmpp2m" | "heun", grad="exact" | "adjoint" | … | None)

x_T is what the model's diffusers pipeline takes as ``latents=`` and x_0 what it hands to its VAE. x_0 is
connected to x_T, every floating tensor of cond and uncond (tensors or dicts of the network's keyword
arguments) and every parameter of the model with requires_grad, through the chosen gradient mode, so
``loss(x_0).backward()`` fills their ``.grad``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .conditioning import Tree
from .gradients import Adjoint, GradMode, Reversible, resolve_grad_mode
from .gradients.base import CustomBackwardMode
from .grid import TimeGrid, grid_from_scheduler, prediction_type_of, schedule_from_scheduler
from .model import Denoiser, trainable_parameters
from .schedule import NoiseSchedule
from .solvers import make_solver, solver_name
from .stochastic import check_deterministic_scheduler, is_stochastic, make_stochastic_solver, resolve_noise
from .validation import check_eta, check_noise_unused, check_sample_inputs, resolve_timesteps


def sample(
    model: Callable,
    x_T: torch.Tensor,
    *,
    schedule,
    timesteps=None,
    steps: int | None = None,
    cond: Tree = None,
    uncond: Tree = None,
    guidance_scale: float = 1.0,
    solver: str = "ddim",
    grad: str | GradMode | None = "exact",
    prediction_type: str | None = None,
    params: Sequence[torch.Tensor] | None = None,
    model_kwargs: dict | None = None,
    classifier: Callable | None = None,
    classifier_scale: float = 1.0,
    eta: float = 0.0,
    noise=None,
) -> torch.Tensor:
    """Sample x_0 from x_T by solving the probability-flow ODE, differentiably.

    Args:
        model: a diffusers ``UNet2DConditionModel`` / ``UNet2DModel`` / transformer (SD3, Flux, PixArt,
            DiT, …) as it is, or a callable ``(x, t, cond) -> tensor``. Put it in eval mode (dropout breaks
            recomputation).
        x_T: the initial noise, exactly the pipeline's ``latents=``: (B, C, H, W) unit noise, or packed
            (B, L, C·4) tokens for Flux.
        schedule: the configured diffusers scheduler (its grid, sigmas and ``prediction_type`` are
            used: DDIM, Euler, DPM-Solver++, FlowMatchEuler, …), or a :class:`NoiseSchedule`
            (:class:`VPSchedule`, :class:`FlowMatchingSchedule`).
        timesteps: model times in decreasing order (diffusers' ``scheduler.timesteps``; floats allowed).
        steps: instead of ``timesteps``, N steps: the scheduler's own ``set_timesteps(N)`` grid (on a
            copy), or N times uniform from t_max to t_min of a :class:`NoiseSchedule`.
        cond, uncond: the conditioning and the negative (empty-prompt) conditioning for classifier-free
            guidance with scale ``guidance_scale`` (one batched network call): a tensor
            (``encoder_hidden_states``, (B or 1, L, D)) or a dict of the network's keyword arguments,
            nested dicts allowed (SDXL ``added_cond_kwargs``, SD3/Flux ``pooled_projections``, Flux
            ``txt_ids``/``img_ids``/``guidance``, PixArt ``encoder_attention_mask``, DiT ``class_labels``).
            Under guidance a key in both is batched [uncond; cond], a key in cond alone is shared.
        solver: "ddim" (alias "euler": Euler in the grid's coordinates), "dpmpp2m" (DPM-Solver++(2M))
            or "heun"; stochastic: "ddpm", "euler_ancestral", "dpmpp2m_sde", "lcm", "ddim" with eta > 0.
        grad: how x_0 is differentiated: "exact" (exact discrete adjoint; default), "adjoint"
            (AdjointDPM's continuous adjoint; see :class:`Adjoint` for options), "backprop",
            "checkpoint", "truncated" (see :class:`Truncated`), "reversible", or None for plain sampling.
        prediction_type: "epsilon", "sample", "v_prediction" or "flow_prediction" (default: the
            scheduler's; flow-matching schedulers predict the velocity; else epsilon).
        params: extra tensors the model uses that should receive gradients (the model's own
            parameters with requires_grad are found automatically).
        model_kwargs: extra keyword arguments for every network call (e.g. ``joint_attention_kwargs``).
        classifier, classifier_scale: classifier guidance, ``classifier(x_t, t) -> log p(y | x_t, t)``
            per sample; ε̂ ← ε̂ − s σ ∇ₓ log p, differentiated exactly (double backward) by every mode.
        eta: DDIM's η in [0, 1]: solver="ddim" with eta > 0 injects noise (η = 1: DDPM's posterior).
        noise: the stochastic solvers' injected noises ("ddpm", "euler_ancestral", "dpmpp2m_sde", "lcm",
            "ddim" with eta > 0; see :mod:`adjointdpm.stochastic`): an (N, B, *latent) tensor (noise[i] is
            step i's draw; it may require grad, and may be computed from other tensors), an int seed or a
            torch.Generator (regenerated per step, not stored), a list of either with one per sample (a
            sample's noises then do not depend on its batch), or None (a seed from torch's global
            generator). Their gradient modes: exact, backprop, checkpoint, truncated.
    """
    if isinstance(schedule, NoiseSchedule):
        path, scheduler = schedule, None
    else:
        scheduler, path = schedule, schedule_from_scheduler(schedule)
        if prediction_type is None:
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
    check_sample_inputs(model, x_T, cond, uncond, float(guidance_scale), denoiser.style)
    if scheduler is None:
        grid = TimeGrid.from_timesteps(path, resolve_timesteps(path, timesteps, steps))
    else:
        if timesteps is None and steps is not None:
            scheduler, timesteps = _scheduler_timesteps(scheduler, steps)
            steps = None
        grid = grid_from_scheduler(scheduler, path, resolve_timesteps(path, timesteps, steps))
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
        ode_solver = make_solver(solver, denoiser, grid)
    if not denoiser.uses_guidance:
        uncond = None
    if grid.input_scale != 1.0:
        x_T = grid.input_scale * x_T
    if mode is None:
        with torch.no_grad():
            x, hist = x_T, ()
            for i in range(ode_solver.num_steps):
                x, hist = ode_solver.step(i, x, hist, cond, uncond)
        return x
    weights = trainable_parameters(model, [p for p in params or [] if all(p is not n for n in noises)])
    pairs = [(given, used) for given, used in zip(noises, read) if given.requires_grad]
    noises, read = [given for given, _ in pairs], [used for _, used in pairs]
    if isinstance(mode, CustomBackwardMode):
        x0 = mode.run(ode_solver, x_T, cond, uncond, weights + noises, stand_ins=weights + read)
    else:
        x0 = mode.run(ode_solver, x_T, cond, uncond, weights + noises)
    if x0.requires_grad:
        x0.register_hook(_check_incoming_gradient)
    return x0


def _scheduler_timesteps(scheduler, steps):
    """The scheduler's own grid for ``steps`` steps, set on a copy (the caller's scheduler is untouched)."""
    import copy

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
