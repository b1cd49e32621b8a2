"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``) and the embedded digits model.

How the pipeline conditions its UNet: the CLIP tokenizer pads every prompt to ``model_max_length``,
the ``CLIPTextModel``'s last hidden state (B, L, D) is the UNet's ``encoder_hidden_states`` -
a plain tensor, which is what ``encode_prompt`` returns; the negative prompt is "" through the same
encoder. x_T is unit noise on the UNet's ``sample_size`` grid (the pipeline scales it by the
scheduler's ``init_noise_sigma``); the VAE decodes ``x0 / scaling_factor``. The embedded digits
model (``AdjointDPMPixelPipeline``) is the same layout in pixel space, without a VAE.
"""
from __future__ import annotations

import torch

from .base import SCHEDULER, UNET, VAE, Family, Part, pad_ids, text_encoder, tokenizer


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
        return int(c.unet.config.in_channels), int(h), int(w)

    def encode_prompt(self, c, prompts, **kwargs) -> torch.Tensor:
        ids = pad_ids(c.tokenizer, prompts, c.tokenizer.model_max_length, c.text_encoder.device)
        return c.text_encoder(ids)[0]
