"""An image classifier from a local transformers folder (any ``AutoModelForImageClassification``).

``Classifier(images)`` returns logits (B, K) for images in [-1, 1] through the folder's own
preprocessing (:class:`~.preprocess.Preprocess`), differentiable w.r.t. the images. Classes are named by
``config.id2label``; :meth:`Classifier.class_index` takes an index or a label name.
"""

from __future__ import annotations

import torch

from .errors import CriticError
from .folders import check_folder, image_processor, load_model
from .preprocess import Preprocess


class Classifier(torch.nn.Module):
    kind = "classifier"

    def __init__(self, model: torch.nn.Module, preprocess: Preprocess, path: str):
        super().__init__()
        self.model, self.preprocess, self.path = model, preprocess, path
        self.id2label = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}

    @classmethod
    def from_folder(cls, path, device="cpu", what: str = "--classifier") -> "Classifier":
        from transformers import AutoModelForImageClassification

        folder = check_folder(path, what)
        proc = image_processor(folder, what)
        model = load_model(AutoModelForImageClassification, folder, what, device)
        return cls(model, Preprocess(proc).to(device), str(folder))

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_labels)

    def class_index(self, target) -> int:
        """A class index from an index (``3``, ``"3"``) or a label name (``"tabby cat"``, case-insensitive)."""
        text = str(target).strip()
        if text.lstrip("-").isdigit():
            index = int(text)
            if not 0 <= index < self.num_classes:
                raise CriticError(f"class {index} is out of range: {self.path} has {self.num_classes} classes (0..{self.num_classes - 1})")
            return index
        by_name = {v.lower(): k for k, v in self.id2label.items()}
        if text.lower() in by_name:
            return by_name[text.lower()]
        close = [v for v in self.id2label.values() if text.lower() in v.lower()][:5]
        hint = f"; labels containing it: {', '.join(close)}" if close else ""
        raise CriticError(f"{self.path} has no class named {text!r} (its config.id2label names the classes){hint}")

    def label(self, index: int) -> str:
        return self.id2label.get(int(index), str(index))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=self.preprocess(images)).logits.float()
