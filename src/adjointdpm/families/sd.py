"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``) and the embedded digits model.

How the pipeline conditions its UNet: the CLIP tokenizer pads every prompt to ``model_max_length``,
the ``CLIPTextModel``'s last hidden state (B, L, D) is the UNet's ``encoder_hidden_states`` -
a plain tensor, which is what ``encode_prompt`` returns; the negative prompt is "" through the same
encoder. x_T is unit noise on the UNet's ``sample_size`` grid (the pipeline scales it by the
scheduler's ``init_noise_sigma``); the VAE decodes ``x0 / scaling_factor``. The embedded digits
model (``AdjointDPMPixelPipeline``) is the same layout in pixel space, without a VAE.

Sampling (``sampling_setup``): like every family, the folder's own scheduler with its own grid for N
steps (``set_timesteps(N)``; SD 1.5's PNDMScheduler: PLMS on its N distinct times), its twin solver, and
``StableDiffusionPipeline``'s defaults (50 steps, guidance 7.5) unless the folder's ``adjointdpm.json``
sets them; the empty prompt's hidden states are one negative row that the engine shares across the batch.
One explicit recipe, for a folder whose ``adjointdpm.json`` says ``"timesteps": "uniform"`` (the embedded
digits model: no diffusers scheduler config gives its grid): the VP path of the scheduler's ``alphas_cumprod``
at N model times uniform over the training range, t_max … 0 (:meth:`NoiseSchedule.default_timesteps`), with
the folder's default solver (``adjointdpm.json``; the embedded model: dpmpp2m, its DPMSolverMultistepScheduler's twin).
"""
from __future__ import annotations

import torch

from ..schedule import VPSchedule
from ..validation import resolve_timesteps
from .base import (SCHEDULER, UNET, VAE, Family, Part, SamplingSetup, negative_prompt, pad_ids, text_encoder,
                   tokenizer)

#: the ``adjointdpm.json`` value of "timesteps" that asks for N times uniform over the training range
UNIFORM_GRID = "uniform"


class StableDiffusion(Family):
    name = "sd"
    pipelines = ("StableDiffusionPipeline", "AdjointDPMPixelPipeline")
    network = "unet"
    parts = (UNET, text_encoder(), tokenizer(), SCHEDULER, Part(VAE.name, VAE.weights, required=False))
    settings = {"default_guidance_scale": 7.5, "default_steps": 50, "default_solver": "dpmpp2m"}

    def image_latent_shape(self, c) -> tuple[int, int, int]:
        s = c.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        f = self.vae_scale_factor(c)  # (the settings' height / width in pixels, where given)
        h = int(c.settings["height"]) // f if c.settings.get("height") else int(h)
        w = int(c.settings["width"]) // f if c.settings.get("width") else int(w)
        return int(c.unet.config.in_channels), h, w

    def encode_text(self, c, prompts, **kwargs) -> torch.Tensor:
        ids = pad_ids(c.tokenizer, prompts, c.tokenizer.model_max_length, c.device)
        return c.text_encoder(ids)[0]

    def set_timesteps(self, c, steps: int) -> torch.Tensor:
        """The scheduler's grid as ``StableDiffusionPipeline`` sets it: the pipeline first rewrites an outdated
        scheduler config (``steps_offset`` ≠ 1 → 1, ``clip_sample`` True → False), so the same is done here."""
        if c.pipeline_config.get("_class_name") == "StableDiffusionPipeline":
            config = c.scheduler.config
            fixes = {k: v for k, v, wrong in (("steps_offset", 1, getattr(config, "steps_offset", 1) != 1),
                                              ("clip_sample", False, getattr(config, "clip_sample", False) is True))
                     if wrong}
            if fixes:
                c.scheduler.register_to_config(**fixes)
        return super().set_timesteps(c, steps)

    def sampling_setup(self, c, steps: int, guidance_scale: float, true_cfg_scale: float | None = None,
                       with_uncond: bool = True) -> SamplingSetup:
        if c.settings.get("timesteps") != UNIFORM_GRID:
            return super().sampling_setup(c, steps, guidance_scale, true_cfg_scale, with_uncond)
        schedule = VPSchedule.from_alphas_cumprod(c.alphas_cumprod)  # the recipe's path, not the scheduler's steps
        timesteps = resolve_timesteps(schedule, None, steps)
        w = float(guidance_scale)
        return SamplingSetup(schedule, timesteps, w, {}, self.sampling_uncond(c, 1, w, {}) if with_uncond else None)

    def sampling_uncond(self, c, n: int, guidance_scale: float, encode_kwargs: dict):
        """The empty prompt's hidden states, one row whatever ``n`` (the engine shares it across the batch)."""
        if guidance_scale == 1.0:
            return None
        with torch.no_grad():
            return self.encode_prompt(c, [negative_prompt(c)]).detach()
