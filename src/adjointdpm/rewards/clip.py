"""CLIP-family rewards from a local transformers ``CLIPModel`` folder: ``clip:FOLDER`` and ``pickscore:FOLDER``.

With e_I(x) the unit image embedding (through the folder's own preprocessing, re-done in torch so the
gradient reaches the pixels) and e_T(p) the unit text embedding of the prompt p:

* ``clip``      r = cos(e_I(x), e_T(p))                       (CLIP score / 100)
* ``pickscore`` r = exp(logit_scale) · cos(e_I(x), e_T(p))     (PickScore's convention: its CLIPModel's
  learnt temperature, about 100, times the cosine; a PickScore folder is an ordinary CLIPModel folder)

Text embeddings are cached per prompt (the text tower is frozen). ``features`` are e_I(x).
"""

from __future__ import annotations

import torch

from ..critics.clip import Clip
from .base import Reward, model_dtype


class ClipReward(Reward):
    kind = "clip"

    def __init__(self, clip: Clip, spec: str):
        super().__init__(spec)
        self.clip = clip
        self._text_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_folder(cls, path, spec: str, device="cpu", what: str = "--reward") -> "ClipReward":
        return cls(Clip.from_folder(path, device=device, what=f"{what} {cls.kind}:"), spec)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        dtype = model_dtype(self.clip.model)
        device = self.clip.preprocess.mean.device
        missing = sorted({p for p in prompts if (p, dtype, device) not in self._text_cache})
        if missing:
            for p, e in zip(missing, self.clip.text_embeds(missing)):
                self._text_cache[(p, dtype, device)] = e.to(dtype)
        return torch.stack([self._text_cache[(p, dtype, device)] for p in prompts])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.image_embeds(images, model_dtype(self.clip.model))

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.features(images) * self.text_embeds(prompts)).sum(-1)

    def score(self, images, prompts, fields):
        return self.cosine(images, prompts)

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "folder": self.clip.path,
                "preprocess": self.clip.preprocess.describe()}


class PickScoreReward(ClipReward):
    kind = "pickscore"

    def score(self, images, prompts, fields):
        scale = self.clip.model.logit_scale.exp()
        return scale.to(images.device) * self.cosine(images, prompts)

    def describe(self) -> dict:
        return {**super().describe(), "logit_scale_exp": float(self.clip.model.logit_scale.exp())}
