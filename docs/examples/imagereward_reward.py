"""ImageReward as a plug-in reward: ``--reward docs/examples/imagereward_reward.py:imagereward``.

ImageReward (Xu et al., 2023; the ``image-reward`` package) is BLIP: a ViT image encoder, a BERT text encoder
cross-attending to the image tokens, and an MLP on the [CLS] feature, normalised by the training mean/std. It
is not a CLIP model, so it comes in through the plug-in route. This file scores differentiably: the image
preprocessing (bicubic resize of the shorter side to 224, centre crop, CLIP mean/std) is done in torch.

Set up once, offline afterwards:

    pip install image-reward
    # put ImageReward.pt and med_config.json (from the THUDM/ImageReward model repository) in one folder:
    export IMAGEREWARD_DIR=/models/ImageReward
    # the BLIP text side loads the "bert-base-uncased" tokenizer by name: download it once into the Hugging Face
    # cache (or run once online), then HF_HUB_OFFLINE=1 works

The checkpoint is read with ``torch.load(weights_only=True)`` (tensors only) into the package's model class;
the package's own ``ImageReward.load`` would unpickle it without that restriction.

Not run by the test suite (it needs the package and a 1.7 GB download).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIZE = 224


@lru_cache(maxsize=1)
def _model(device: str):
    from ImageReward.ImageReward import ImageReward  # the image-reward package's model class

    folder = Path(os.environ.get("IMAGEREWARD_DIR", "")).expanduser()
    checkpoint, med_config = folder / "ImageReward.pt", folder / "med_config.json"
    if not checkpoint.is_file() or not med_config.is_file():
        raise FileNotFoundError(f"set IMAGEREWARD_DIR to a folder holding ImageReward.pt and med_config.json "
                                f"(got {str(folder) or 'nothing'})")
    model = ImageReward(med_config=str(med_config), device=device)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True), strict=False)
    return model.to(device).eval().requires_grad_(False)


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> BLIP's input, differentiably: shorter side to 224 (bicubic), centre crop, normalise."""
    x = (images.float() + 1) / 2
    h, w = x.shape[-2:]
    scale = SIZE / min(h, w)
    x = F.interpolate(x, size=(max(SIZE, round(h * scale)), max(SIZE, round(w * scale))), mode="bicubic",
                      align_corners=False, antialias=True)
    top, left = (x.shape[-2] - SIZE) // 2, (x.shape[-1] - SIZE) // 2
    x = x[..., top:top + SIZE, left:left + SIZE]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def imagereward(images: torch.Tensor, *, prompts: list[str]) -> torch.Tensor:
    """(B,) ImageReward scores of images (B, 3, H, W) in [-1, 1] for their prompts; differentiable."""
    model = _model(str(images.device))
    tokens = model.blip.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                                  return_tensors="pt").to(images.device)
    image_tokens = model.blip.visual_encoder(_pixels(images))
    attention = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=images.device)
    text = model.blip.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask,
                                   encoder_hidden_states=image_tokens, encoder_attention_mask=attention,
                                   return_dict=True)
    score = model.mlp(text.last_hidden_state[:, 0, :]).squeeze(-1)
    return (score - model.mean) / model.std
