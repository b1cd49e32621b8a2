"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``) and the embedded digits model.

How the pipeline conditions its UNet: the CLIP tokenizer pads every prompt to ``model_max_length``,
the ``CLIPTextModel``'s last hidden state (B, L, D) is the UNet's ``encoder_hidden_states`` -
a plain tensor, which is what ``encode_prompt`` returns; the negative prompt is "" through the same
encoder. x_T is unit noise on the UNet's ``sample_size`` grid (the pipeline scales it by the
scheduler's ``init_noise_sigma``); the VAE decodes ``x0 / scaling_factor``. The embedded digits
model (``AdjointDPMPixelPipeline``) is the same layout in pixel space, without a VAE.

Sampling (``sampling_setup``): the continuous VP path of the scheduler's ``alphas_cumprod`` at N model
times uniform over the training range, t_max … t_min (the figures' grid, not the scheduler's own), and
the empty prompt's hidden states as one negative row that the engine shares across the batch.
"""
from __future__ import annotations

import torch

from ..schedule import VPSchedule
from ..validation import resolve_timesteps
from .base import (SCHEDULER, UNET, VAE, Family, Part, SamplingSetup, negative_prompt, pad_ids, text_encoder,
                   tokenizer)


class StableDiffusion(Family):
    name = "sd"
    pipelines = ("StableDiffusionPipeline", "AdjointDPMPixelPipeline")
    network = "unet"
    parts = (UNET, text_encoder(), tokenizer(), SCHEDULER, Part(VAE.name, VAE.weights, required=False))
    settings = {"default_guidance_scale": 7.5, "default_steps": 25, "default_solver": "dpmpp2m"}

    def default_settings(self, c) -> dict:
        return dict(self.settings)  # (as before the other families: not chosen from the scheduler)

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

    def sampling_setup(self, c, steps: int, guidance_scale: float, true_cfg_scale: float | None = None,
                       with_uncond: bool = True) -> SamplingSetup:
        schedule = VPSchedule.from_alphas_cumprod(c.alphas_cumprod)
        timesteps = resolve_timesteps(schedule, None, steps)
        w = float(guidance_scale)
        return SamplingSetup(schedule, timesteps, w, {}, self.sampling_uncond(c, 1, w, {}) if with_uncond else None)

    def sampling_uncond(self, c, n: int, guidance_scale: float, encode_kwargs: dict):
        """The empty prompt's hidden states, one row whatever ``n`` (the engine shares it across the batch)."""
        if guidance_scale == 1.0:
            return None
        with torch.no_grad():
            return self.encode_prompt(c, [negative_prompt(c)]).detach()
