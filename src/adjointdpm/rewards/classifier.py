"""Classifier rewards: the log-probability of the class a prompt's fields name.

r(x) = log softmax(f(x))_c, c = the prompt's field ``class`` (an index, or a label name of the classifier).

* ``classifier:FOLDER`` — any transformers ``AutoModelForImageClassification`` folder, through its own
  preprocessing re-done in torch; ``features`` are its last hidden state, averaged over positions.

The digits model's own classifiers (``digits-guide`` / ``digits-judge``) are in
:mod:`adjointdpm.embedded.rewards`, on the same :func:`field_classes` convention.
"""

from __future__ import annotations

import torch

from ..critics.classifier import Classifier
from ..critics.errors import CriticError
from .base import Reward, model_dtype

CLASS_FIELD = "class"


def field_classes(fields: list[dict], prompts: list[str], what: str) -> list:
    """Each prompt's ``class`` field; a prompt without one is an error naming the fix."""
    missing = [p for p, f in zip(prompts, fields) if f.get(CLASS_FIELD) is None]
    if missing:
        raise CriticError(f"{what} needs each prompt's field {CLASS_FIELD!r} (a class index or label name); prompt "
                          f"{missing[0]!r} has none: give the prompts as .jsonl lines like "
                          f'{{"prompt": "...", "{CLASS_FIELD}": 3}}')
    return [f[CLASS_FIELD] for f in fields]


class ClassifierReward(Reward):
    kind = "classifier"

    def __init__(self, classifier: Classifier, spec: str):
        super().__init__(spec)
        self.classifier = classifier

    @classmethod
    def from_folder(cls, path, spec: str, device="cpu", what: str = "--reward") -> "ClassifierReward":
        return cls(Classifier.from_folder(path, device=device, what=f"{what} classifier:"), spec)

    def _outputs(self, images, hidden: bool = False):
        pixels = self.classifier.preprocess(images, model_dtype(self.classifier.model))
        return self.classifier.model(pixel_values=pixels, output_hidden_states=hidden)

    def score(self, images, prompts, fields):
        index = [self.classifier.class_index(c) for c in field_classes(fields, prompts, f"reward {self.spec}")]
        logp = torch.log_softmax(self._outputs(images).logits, dim=-1)
        return logp.gather(1, torch.tensor(index, device=logp.device)[:, None]).squeeze(1)

    def features(self, images):
        h = self._outputs(images, hidden=True).hidden_states[-1]
        return h.flatten(2).mean(-1) if h.dim() == 4 else h.mean(1)

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "folder": self.classifier.path, "field": CLASS_FIELD,
                "classes": self.classifier.num_classes, "preprocess": self.classifier.preprocess.describe()}
