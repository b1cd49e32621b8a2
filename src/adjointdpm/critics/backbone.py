"""A vision backbone from a local transformers folder, as a feature network for style losses.

Any ``AutoModel`` that returns hidden states (CLIP vision, ResNet, ConvNeXt, DINOv2, ViT …) through the
folder's preprocessing. Its hidden states h_l are either feature maps (B, C, H, W) or token sequences
(B, N, D); the Gram matrix of a layer is G_l = A Aᵀ / n with A the (C × HW) or (D × N) feature matrix
(n = HW or N), the style statistics of Gatys et al. The content feature is the last hidden state,
flattened.

:class:`GramStyle`: the style loss (1/L) Σ_l ‖G_l(x) − G_l(ref)‖²_F / s_l, with s_l calibrated so that a
batch of the untuned model's images scores 1 on average (so style and content are on one scale).
"""

from __future__ import annotations

import torch

from .errors import CriticError
from .folders import check_folder, image_processor, load_model, read_config
from .preprocess import Preprocess


class Backbone(torch.nn.Module):
    kind = "backbone"

    def __init__(self, model, preprocess: Preprocess, path: str, layers: int = 4):
        super().__init__()
        self.model, self.preprocess, self.path, self.layers = model, preprocess, path, layers

    @classmethod
    def from_folder(cls, path, device="cpu", what: str = "--backbone", layers: int = 4) -> "Backbone":
        from transformers import AutoModel, CLIPVisionModel

        folder = check_folder(path, what)
        proc = image_processor(folder, what)
        model_type = read_config(folder).get("model_type")
        cls_ = CLIPVisionModel if model_type == "clip" else AutoModel  # (a whole CLIP folder: its vision tower)
        model = load_model(cls_, folder, what, device)
        return cls(model, Preprocess(proc).to(device), str(folder), layers)

    def hidden_states(self, images: torch.Tensor) -> list[torch.Tensor]:
        out = self.model(pixel_values=self.preprocess(images), output_hidden_states=True)
        states = getattr(out, "hidden_states", None)
        if not states:
            raise CriticError(f"{self.path} returns no hidden states: use a vision backbone folder "
                              "(CLIP vision, ResNet, ConvNeXt, DINOv2, ViT)")
        return [s.float() for s in states]

    def grams(self, images: torch.Tensor) -> list[torch.Tensor]:
        states = self.hidden_states(images)[1:] or self.hidden_states(images)
        picked = states[-self.layers:] if len(states) > self.layers else states
        grams = []
        for h in picked:
            a = h.flatten(2) if h.dim() == 4 else h.transpose(1, 2)  # (B, C, HW) or (B, D, N)
            grams.append(a @ a.transpose(1, 2) / a.shape[-1])
        return grams

    def content(self, images: torch.Tensor) -> torch.Tensor:
        return self.hidden_states(images)[-1].flatten(1)


class GramStyle(torch.nn.Module):
    """Calibrated Gram-matrix distance to one reference image (see the module docstring)."""

    def __init__(self, backbone: Backbone, reference: torch.Tensor):
        super().__init__()
        self.backbone = backbone
        with torch.no_grad():
            self.ref = [g.detach() for g in backbone.grams(reference)]
        self.scale = [r.pow(2).sum().clamp_min(1e-12) for r in self.ref]

    def distances(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [(g - r).pow(2).flatten(1).sum(1) for g, r in zip(self.backbone.grams(images), self.ref)]

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor) -> None:
        self.scale = [d.mean().clamp_min(1e-12) for d in self.distances(images)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return sum(d / s for d, s in zip(self.distances(images), self.scale)) / len(self.scale)
