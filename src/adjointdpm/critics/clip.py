"""CLIP from a local transformers folder (``CLIPModel`` + its tokenizer + its image processor).

``Clip.image_embeds(images)`` are the unit image embeddings of images in [-1, 1] (differentiable, through
the folder's preprocessing); ``Clip.text_embeds(prompts)`` the unit text embeddings. The guidance loss
toward a text T is 1 − cos(e_image, e_T) per image (CLIP score × 100 = 100 · cos, reported as ``clip_score``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import CriticError
from .folders import check_folder, image_processor, load_model
from .preprocess import Preprocess


class Clip(torch.nn.Module):
    kind = "clip"

    def __init__(self, model, tokenizer, preprocess: Preprocess, path: str):
        super().__init__()
        self.model, self.tokenizer, self.preprocess, self.path = model, tokenizer, preprocess, path

    @classmethod
    def from_folder(cls, path, device="cpu", what: str = "--clip") -> "Clip":
        from transformers import AutoTokenizer, CLIPModel

        folder = check_folder(path, what)
        proc = image_processor(folder, what)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise CriticError(f"{what} {folder} has no readable tokenizer ({str(e).splitlines()[0]}); save it "
                              "with tokenizer.save_pretrained(folder)") from None
        model = load_model(CLIPModel, folder, what, device)
        return cls(model, tokenizer, Preprocess(proc).to(device), str(folder))

    def image_embeds(self, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Unit image embeddings, in float32 (or in ``dtype``, the model's, e.g. float64 for gradient checks)."""
        feats = self.model.get_image_features(pixel_values=self.preprocess(images, dtype))
        feats = getattr(feats, "pooler_output", feats)
        return F.normalize(feats.to(dtype or torch.float32), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        tok = {k: v.to(self.preprocess.mean.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        feats = self.model.get_text_features(**tok)
        feats = getattr(feats, "pooler_output", feats)
        return F.normalize(feats.float(), dim=-1)

    def cosine(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B,) cosine of each image to the text embedding ``text`` (1, D) or (B, D)."""
        return (self.image_embeds(images) * text).sum(-1)
