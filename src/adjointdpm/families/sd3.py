"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): two CLIP encoders and T5 into an MMDiT.

How the pipeline conditions its ``SD3Transformer2DModel``:

* CLIP: both tokenizers pad to the first tokenizer's ``model_max_length``; each
  ``CLIPTextModelWithProjection`` gives its penultimate hidden state and its pooled ``text_embeds``;
  the hidden states are concatenated on the feature axis and zero-padded to T5's width;
* T5: ``tokenizer_3`` pads to ``max_sequence_length`` (256; ``adjointdpm.json`` may set it), the
  ``T5EncoderModel``'s last hidden state; without a ``text_encoder_3`` these are zeros of width
  ``joint_attention_dim``;
* ``encoder_hidden_states`` = [CLIP (padded); T5] along the token axis, ``pooled_projections`` =
  [pooled 1, pooled 2] along the feature axis; the negative prompt is "" through the same path.

The time grid is ``FlowMatchEulerDiscreteScheduler``'s (shifted) sigmas; with ``use_dynamic_shifting``
the shift exponent is ``mu = calculate_shift((H/p)(W/p))`` from the latent's patch count, with the
scheduler config's bounds (defaults 256, 4096, 0.5, 1.16). x_T is unit noise (B, C, H, W); the VAE
decodes ``x0 / scaling_factor + shift_factor``.
"""
from __future__ import annotations

import torch

from .base import SCHEDULER, TRANSFORMER, VAE, Family, calculate_shift, pad_ids, text_encoder, tokenizer


class StableDiffusion3(Family):
    name = "sd3"
    pipelines = ("StableDiffusion3Pipeline",)
    network = "transformer"
    parts = (TRANSFORMER, text_encoder(1), text_encoder(2), text_encoder(3, required=False), tokenizer(1),
             tokenizer(2), tokenizer(3, required=False), SCHEDULER, VAE)
    settings = {"default_guidance_scale": 7.0, "default_steps": 28, "default_solver": "ddim",
                "max_sequence_length": 256}

    def prompt_tokenizer(self, c):
        return c.tokenizer_3 if c.tokenizer_3 is not None else c.tokenizer

    def _clip(self, c, prompts, i: int):
        tok, enc = (c.tokenizer, c.text_encoder) if i == 1 else (c.tokenizer_2, c.text_encoder_2)
        out = enc(pad_ids(tok, prompts, c.tokenizer.model_max_length, c.device), output_hidden_states=True)
        return out.hidden_states[-2].to(c.text_encoder.dtype), out[0]

    def _t5(self, c, prompts) -> torch.Tensor:
        length = int(c.settings["max_sequence_length"])
        if c.text_encoder_3 is None:
            return torch.zeros((len(prompts), length, c.network.config.joint_attention_dim),
                               dtype=c.text_encoder.dtype, device=c.device)
        ids = c.tokenizer_3(list(prompts), padding="max_length", max_length=length, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids
        return c.text_encoder_3(ids.to(c.device))[0].to(c.text_encoder_3.dtype)

    def encode_text(self, c, prompts, **kwargs) -> dict:
        h1, p1 = self._clip(c, prompts, 1)
        h2, p2 = self._clip(c, prompts, 2)
        t5 = self._t5(c, prompts)
        clip = torch.cat([h1, h2], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                "pooled_projections": torch.cat([p1, p2], dim=-1)}

    def set_timesteps(self, c, steps: int) -> torch.Tensor:
        cfg = c.scheduler.config
        kwargs = {}
        if cfg.get("use_dynamic_shifting", None):
            _, h, w = self.image_latent_shape(c)
            p = c.network.config.patch_size
            kwargs["mu"] = calculate_shift((h // p) * (w // p), cfg.get("base_image_seq_len", 256),
                                           cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                           cfg.get("max_shift", 1.16))
        c.scheduler.set_timesteps(int(steps), device=c.device, **kwargs)
        return c.scheduler.timesteps
