"""Stable Diffusion XL (``StableDiffusionXLPipeline``): two CLIP text encoders, pooled text and size ids.

How the pipeline conditions its UNet (``addition_embed_type="text_time"``):

* each prompt goes through both tokenizers (padded to ``model_max_length``) and both encoders,
  ``text_encoder`` (``CLIPTextModel``) and ``text_encoder_2`` (``CLIPTextModelWithProjection``);
  ``encoder_hidden_states`` is the concatenation, on the feature axis, of both encoders'
  *penultimate* hidden states (``hidden_states[-2]``);
* ``added_cond_kwargs["text_embeds"]`` is the pooled, projected output of the first encoder that
  returns a 2-D first output - ``text_encoder_2``'s ``text_embeds``;
* ``added_cond_kwargs["time_ids"]`` is ``original_size + crop_top_left + target_size`` =
  ``(H, W, 0, 0, H, W)`` in pixels, one row per image, the same for the negative prompt;
* the negative cond: with ``force_zeros_for_empty_prompt`` (the default of the pipeline, stored in
  ``model_index.json``) and no negative prompt, zeros of the prompt's hidden states and pooled
  embeddings; otherwise "" through both encoders.

x_T is unit noise (the pipeline scales it by ``init_noise_sigma``); the VAE decodes
``x0 * latents_std / scaling_factor + latents_mean`` when its config has both, else ``x0 / scaling_factor``.
"""
from __future__ import annotations

import torch

from .base import SCHEDULER, UNET, VAE, Family, negative_prompt, pad_ids, text_encoder, tokenizer


class StableDiffusionXL(Family):
    name = "sdxl"
    pipelines = ("StableDiffusionXLPipeline",)
    network = "unet"
    parts = (UNET, text_encoder(1), text_encoder(2), tokenizer(1), tokenizer(2), SCHEDULER, VAE)
    settings = {"default_guidance_scale": 5.0, "default_steps": 50, "default_solver": "dpmpp2m"}

    def _time_ids(self, c, n: int, dtype) -> torch.Tensor:
        h, w = self.image_size(c)
        unet = c.unet
        if getattr(unet, "add_embedding", None) is not None and c.text_encoder_2 is not None:
            wanted = unet.add_embedding.linear_1.in_features
            given = unet.config.addition_time_embed_dim * 6 + c.text_encoder_2.config.projection_dim
            if wanted != given:
                raise ValueError(f"this SDXL UNet expects an added embedding of width {wanted}, but 6 size ids and "
                                 f"text_encoder_2's projection give {given}: the folder's configs do not match")
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=c.device).repeat(n, 1)

    def encode_text(self, c, prompts, **kwargs) -> dict:
        hidden, pooled = [], None
        for tok, enc in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
            out = enc(pad_ids(tok, prompts, tok.model_max_length, c.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        h = torch.cat(hidden, dim=-1).to(c.text_encoder_2.dtype)
        return {"encoder_hidden_states": h,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": self._time_ids(c, len(prompts), h.dtype)}}

    def negative_cond(self, c, n: int, **kwargs) -> dict:
        if c.settings.get("negative_prompt") is not None or not c.pipeline_config.get("force_zeros_for_empty_prompt", True):
            return self.encode_prompt(c, [negative_prompt(c)] * n)  # (zeros only without a negative prompt)
        # the shapes of the zeros are those of an encoded prompt: encode one, keep its shapes
        ref = self.encode_prompt(c, [""])
        h, pooled = ref["encoder_hidden_states"], ref["added_cond_kwargs"]["text_embeds"]
        return {"encoder_hidden_states": torch.zeros((n, *h.shape[1:]), dtype=h.dtype, device=h.device),
                "added_cond_kwargs": {"text_embeds": torch.zeros((n, *pooled.shape[1:]), dtype=pooled.dtype,
                                                                 device=pooled.device),
                                      "time_ids": self._time_ids(c, n, h.dtype)}}

    def to_vae_latents(self, c, x0: torch.Tensor) -> torch.Tensor:
        cfg = c.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean = torch.tensor(mean, dtype=x0.dtype, device=x0.device).view(shape)
            std = torch.tensor(std, dtype=x0.dtype, device=x0.device).view(shape)
            return x0 * std / cfg.scaling_factor + mean
        return x0 / cfg.scaling_factor
