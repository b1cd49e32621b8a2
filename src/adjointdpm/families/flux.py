"""Flux (``FluxPipeline``): pooled CLIP and T5 into a rectified-flow transformer on packed 2x2 latents.

How the pipeline conditions its ``FluxTransformer2DModel``:

* ``pooled_projections``: the ``CLIPTextModel``'s ``pooler_output`` (tokens padded to
  ``model_max_length``);
* ``encoder_hidden_states``: the ``T5EncoderModel``'s last hidden state, tokens padded to
  ``max_sequence_length`` (512; ``adjointdpm.json`` may set it);
* ``txt_ids``: zeros (L_text, 3); ``img_ids``: (h/2 * w/2, 3) rows ``(0, row, col)`` of the packed grid
  - both unbatched, so the negative cond leaves them out and the engine shares them;
* ``guidance`` (guidance-distilled models, ``guidance_embeds=True``): the guidance scale, float32,
  one per image, fed to the network instead of classifier-free guidance; "true" CFG with an empty
  negative prompt is optional (``true_cfg_scale`` > 1).

Latents are packed: a (C, H, W) latent becomes (H/2 * W/2, 4C) tokens, token (i, j) holding the 2x2
patch at rows 2i..2i+1, columns 2j..2j+1 as (c, dy, dx). x_T is the packing of unit noise (what the
pipeline's ``prepare_latents`` returns); ``decode`` unpacks, then ``x / scaling_factor + shift_factor``.
The time grid: sigmas ``linspace(1, 1/N, N)`` given to ``FlowMatchEulerDiscreteScheduler`` with
``mu = calculate_shift(L)`` from the token count L (scheduler config bounds, defaults 256, 4096, 0.5, 1.15).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import SCHEDULER, TRANSFORMER, VAE, Family, calculate_shift, pad_ids, text_encoder, tokenizer


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C) tokens of 2x2 patches."""
    b, ch, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need an even height and width, got {h}x{w}")
    x = latents.reshape(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), ch * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h*w, 4C) tokens -> (B, C, 2h, 2w) latents; ``height`` x ``width`` is the latent grid (2h x 2w)."""
    h, w = height // 2, width // 2
    if tokens.ndim != 3 or tokens.shape[1] != h * w or tokens.shape[2] % 4:
        raise ValueError(f"Flux tokens of shape {tuple(tokens.shape)} do not pack a {height}x{width} latent "
                         f"(expected (B, {h * w}, 4C))")
    b, _, d = tokens.shape
    x = tokens.reshape(b, h, w, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


class Flux(Family):
    name = "flux"
    pipelines = ("FluxPipeline",)
    network = "transformer"
    parts = (TRANSFORMER, text_encoder(1), text_encoder(2), tokenizer(1), tokenizer(2), SCHEDULER, VAE)
    settings = {"default_guidance_scale": 3.5, "default_steps": 28, "default_solver": "ddim",
                "max_sequence_length": 512}
    shared_keys = ("txt_ids", "img_ids", "guidance")

    def default_sample_size(self, c) -> int:
        return 128  # FluxPipeline's default (1024 px with an 8x VAE), whatever the transformer

    def image_latent_shape(self, c) -> tuple[int, int, int]:
        h, w = self.image_size(c)
        f = self.vae_scale_factor(c)
        return int(c.network.config.in_channels) // 4, 2 * (h // (2 * f)), 2 * (w // (2 * f))

    def latent_shape(self, c) -> tuple[int, int]:
        ch, h, w = self.image_latent_shape(c)
        return (h // 2) * (w // 2), ch * 4

    def noise(self, c, n: int, seed: int) -> torch.Tensor:
        return pack(super().noise(c, n, seed))

    def to_vae_latents(self, c, x0: torch.Tensor) -> torch.Tensor:
        _, h, w = self.image_latent_shape(c)
        return super().to_vae_latents(c, unpack(x0, h, w))

    def image_ids(self, c, dtype) -> torch.Tensor:
        _, h, w = self.image_latent_shape(c)
        rows = torch.arange(h // 2).repeat_interleave(w // 2)
        cols = torch.arange(w // 2).repeat(h // 2)
        ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
        return ids.to(device=c.device, dtype=dtype)

    def default_settings(self, c) -> dict:
        settings = super().default_settings(c)
        if not self.has_guidance_embeds(c):
            settings["default_guidance_scale"] = 1.0  # no guidance embedding: plain sampling unless asked
        return settings

    def prompt_tokenizer(self, c):
        return c.tokenizer_2  # T5 reads the whole prompt; CLIP's pooled view of it is cut at its length

    def has_guidance_embeds(self, c) -> bool:
        return bool(getattr(c.network.config, "guidance_embeds", False))

    def encode_text(self, c, prompts, guidance_scale: float | None = None, **kwargs) -> dict:
        te1, te2 = c.text_encoder, c.text_encoder_2
        ids = pad_ids(c.tokenizer, prompts, c.tokenizer.model_max_length, c.device)
        pooled = te1(ids, output_hidden_states=False).pooler_output.to(te1.dtype)
        length = int(c.settings["max_sequence_length"])
        t5 = te2(pad_ids(c.tokenizer_2, prompts, length, c.device), output_hidden_states=False)[0].to(te2.dtype)
        cond = {"encoder_hidden_states": t5, "pooled_projections": pooled,
                "txt_ids": torch.zeros(t5.shape[1], 3, device=c.device, dtype=te1.dtype),
                "img_ids": self.image_ids(c, t5.dtype)}
        if self.has_guidance_embeds(c):
            w = c.settings["default_guidance_scale"] if guidance_scale is None else guidance_scale
            cond["guidance"] = torch.full((len(prompts),), float(w), device=c.device, dtype=torch.float32)
        return cond

    def guidance(self, c, guidance_scale: float, true_cfg_scale: float | None) -> tuple[float, dict]:
        if self.has_guidance_embeds(c):
            w = float(c.settings.get("true_cfg_scale", 1.0) if true_cfg_scale is None else true_cfg_scale)
            return w, {"guidance_scale": guidance_scale}
        return guidance_scale if true_cfg_scale is None else float(true_cfg_scale), {}

    def set_timesteps(self, c, steps: int) -> torch.Tensor:
        cfg = c.scheduler.config
        steps = int(steps)
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(self.latent_shape(c)[0], cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        if sigmas is None:
            c.scheduler.set_timesteps(steps, device=c.device, mu=mu)
        else:
            c.scheduler.set_timesteps(sigmas=sigmas, device=c.device, mu=mu)
        return c.scheduler.timesteps
