"""Stable Diffusion's own safety checker (diffusers' ``StableDiffusionSafetyChecker``), differentiable.

A pipeline folder's ``safety_checker/`` (a CLIP vision tower + projection, 17 concept embeddings c_k with
thresholds t_k and 3 "special care" embeddings s_j with thresholds u_j) and ``feature_extractor/`` (its
CLIP image processor). For image embedding e (the projected pooled CLIP features), as diffusers computes:

    special_j = cos(e, s_j) − u_j,   a = 0.01 if any [special_j]₃ > 0 else 0
    score_k   = cos(e, c_k) − t_k + a,       flagged  ⇔  any [score_k]₃ > 0

([·]₃: rounded to 3 decimals, as diffusers rounds the scores before comparing them with 0.)

The attack loss pushes every score below −margin:  Σ_k relu(score_k + margin)  (and the special-care
scores too, so the adjustment a vanishes). Preprocessing is the feature extractor's, in torch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import CriticError
from .folders import check_folder, image_processor, load_model
from .preprocess import Preprocess


class SafetyChecker(torch.nn.Module):
    kind = "safety"

    def __init__(self, checker, preprocess: Preprocess, path: str):
        super().__init__()
        self.checker, self.preprocess, self.path = checker, preprocess, path

    @classmethod
    def from_pipeline(cls, model_folder, device="cpu") -> "SafetyChecker":
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        root = Path(model_folder).expanduser()
        if not (root / "safety_checker").is_dir():
            raise CriticError(f"{root} has no safety_checker/ folder: the safety attack needs the pipeline's own "
                              "checker (diffusers' StableDiffusionSafetyChecker)")
        folder = check_folder(root / "safety_checker", "safety_checker")
        extractor = root / "feature_extractor"
        if not extractor.is_dir():
            raise CriticError(f"{root} has no feature_extractor/ folder (the safety checker's image processor)")
        proc = image_processor(extractor, "feature_extractor")
        checker = load_model(StableDiffusionSafetyChecker, folder, "safety_checker", device)
        return cls(checker, Preprocess(proc).to(device), str(folder))

    def embeds(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.checker.vision_model(self.preprocess(images))[1]
        return F.normalize(self.checker.visual_projection(pooled).float(), dim=-1)

    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(concept scores (B, 17), special-care scores (B, 3)), as in the module docstring."""
        e = self.embeds(images)
        c = self.checker
        special = e @ F.normalize(c.special_care_embeds.float(), dim=-1).T - c.special_care_embeds_weights.float()
        adjust = 0.01 * (_rounded(special) > 0).any(-1, keepdim=True).to(e.dtype)
        concept = e @ F.normalize(c.concept_embeds.float(), dim=-1).T - c.concept_embeds_weights.float() + adjust
        return concept, special

    def attack_loss(self, images: torch.Tensor, margin: float) -> torch.Tensor:
        concept, special = self.scores(images)
        return F.relu(concept + margin).sum(-1) + F.relu(special + margin).sum(-1)

    @torch.no_grad()
    def flag(self, images: torch.Tensor) -> torch.Tensor:
        return (_rounded(self.scores(images)[0]) > 0).any(-1)


def _rounded(scores: torch.Tensor) -> torch.Tensor:
    """Scores rounded to 3 decimals (half to even, as Python's round on diffusers' float32 scores)."""
    return torch.round(scores.detach(), decimals=3)
