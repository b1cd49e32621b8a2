"""PixArt-alpha / PixArt-Sigma (``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``): T5 into a DiT.

How the pipeline conditions its ``PixArtTransformer2DModel``:

* each prompt is lower-cased and stripped (the pipelines' text preprocessing without the optional
  caption cleaning), tokenized by T5 padded to ``max_sequence_length`` (Sigma 300, alpha 120;
  ``adjointdpm.json`` may set it);
* ``encoder_hidden_states``: the ``T5EncoderModel``'s last hidden state computed *with* the
  tokenizer's attention mask; ``encoder_attention_mask``: that mask (1 on tokens, 0 on padding);
* ``added_cond_kwargs``: ``{"resolution": None, "aspect_ratio": None}``, except for alpha networks that
  use additional conditions (``sample_size == 128``, 1024 px), which get ``resolution = (H, W)`` and
  ``aspect_ratio = H / W`` per image; the negative prompt is "" through the same path.

The network predicts the noise and, with ``out_channels = 2 x in_channels``, a learned variance;
the pipeline guides both halves and keeps the first (the engine splits it). x_T is unit noise (the
pipeline scales it by ``init_noise_sigma``); the VAE decodes ``x0 / scaling_factor``. The pipelines'
resolution binning (sampling at the nearest trained aspect ratio, then resizing) is not applied:
images are made at the folder's size (``sample_size x`` the VAE factor, or ``adjointdpm.json``'s).
"""
from __future__ import annotations

import torch

from .base import SCHEDULER, TRANSFORMER, VAE, Family, text_encoder, tokenizer


class PixArt(Family):
    name = "pixart"
    pipelines = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    network = "transformer"
    parts = (TRANSFORMER, text_encoder(), tokenizer(), SCHEDULER, VAE)
    settings = {"default_guidance_scale": 4.5, "default_steps": 20, "default_solver": "dpmpp2m"}

    def default_settings(self, c) -> dict:
        settings = super().default_settings(c)
        alpha = c.pipeline_config.get("_class_name") == "PixArtAlphaPipeline"
        settings["max_sequence_length"] = 120 if alpha else 300
        return settings

    def encode_text(self, c, prompts, **kwargs) -> dict:
        text = [p.lower().strip() for p in prompts]
        length = int(c.settings["max_sequence_length"])
        tokens = c.tokenizer(text, padding="max_length", max_length=length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        enc = c.text_encoder
        mask = tokens.attention_mask.to(c.device)
        h = enc(tokens.input_ids.to(c.device), attention_mask=mask)[0].to(enc.dtype)
        added = {"resolution": None, "aspect_ratio": None}
        alpha = c.pipeline_config.get("_class_name") == "PixArtAlphaPipeline"
        if alpha and c.network.config.sample_size == 128:
            hgt, wid = self.image_size(c)
            added = {"resolution": torch.tensor([[hgt, wid]], dtype=h.dtype, device=h.device).repeat(len(text), 1),
                     "aspect_ratio": torch.tensor([[hgt / wid]], dtype=h.dtype, device=h.device).repeat(len(text), 1)}
        return {"encoder_hidden_states": h, "encoder_attention_mask": mask, "added_cond_kwargs": added}
