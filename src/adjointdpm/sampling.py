"""The public entry point: ``sample`` — solve the probability-flow ODE, differentiably.

    x_0 = sample(model, x_T, schedule=scheduler, timesteps=scheduler.timesteps, cond=…, uncond=…,
                 guidance_scale=w, solver=None (the scheduler's twin) | "ddim" | "dpmpp2m" | …, grad="exact" | "adjoint" | … | None)

x_T is what the model's diffusers pipeline takes as ``latents=`` and x_0 what it hands to its VAE. x_0 is
connected to x_T, every floating tensor of cond and uncond (tensors or dicts of the network's keyword
arguments) and every parameter of the model with requires_grad, through the chosen gradient mode, so
``loss(x_0).backward()`` fills their ``.grad``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .conditioning import Tree
from .engine import build_sampler
from .gradients import GradMode


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
    solver: str | None = None,
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
        solver: "ddim" (alias "euler": Euler in the grid's coordinates), "dpmpp2m" (DPM-Solver++(2M)),
            "heun", "pndm" (alias "plms"), "unipc"; stochastic: "ddpm", "euler_ancestral", "dpmpp2m_sde",
            "lcm", "ddim" with eta > 0. Default: the twin of the diffusers scheduler given as ``schedule``
            (PNDMScheduler → "pndm", UniPCMultistepScheduler → "unipc", DPMSolverMultistepScheduler →
            "dpmpp2m", …; see :mod:`adjointdpm.twins`; a class without one is refused, naming this option),
            "ddim" for a :class:`NoiseSchedule`.
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
    sampler = build_sampler(model, schedule, timesteps, steps=steps, solver=solver, eta=eta, grad=grad,
                            prediction_type=prediction_type, guidance_scale=guidance_scale, model_kwargs=model_kwargs,
                            classifier=classifier, classifier_scale=classifier_scale, noise=noise, x_T=x_T, cond=cond,
                            uncond=uncond)
    return sampler.sample(x_T, cond, uncond, params)
