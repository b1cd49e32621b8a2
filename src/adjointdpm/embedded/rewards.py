"""The digits model's classifiers as rewards over prompts: ``--reward digits-guide`` / ``--judge-reward
digits-judge`` (optionally ``:MODEL_FOLDER``, default the embedded model's critics).

r(x) = log softmax(f(x))_c, f the guide classifier (the critic to optimise) or the independent judge (to
evaluate with), c the digit 0..9 in the prompt's field ``class`` (the built-in ``digits`` prompts carry it);
``features`` are the network's penultimate features (the space diversity is measured in), ``accuracy`` the
fraction of images whose arg-max class is the prompt's digit.

They implement :class:`adjointdpm.rewards.Reward`; :data:`DIGIT_REWARDS` is the ``kinds`` mapping the
application passes to :func:`adjointdpm.rewards.load_rewards` (the rewards package never imports this one).
"""

from __future__ import annotations

import torch

from ..critics.errors import CriticError
from ..rewards.base import Reward, model_dtype
from ..rewards.classifier import CLASS_FIELD, field_classes


class DigitsReward(Reward):
    """The digits model's guide (``which="guide"``) or judge (``which="judge"``)."""

    kind = "digits"

    def __init__(self, net: torch.nn.Module, which: str, spec: str, path: str):
        super().__init__(spec)
        self.net, self.which, self.path = net, which, path

    @classmethod
    def from_folder(cls, path, which: str, spec: str, device="cpu") -> "DigitsReward":
        from ..components import ComponentsError
        from .critics import load_critics

        try:
            critics = load_critics(path or None, device=device)
        except ComponentsError as e:
            raise CriticError(f"reward {spec}: {e}") from None
        net = getattr(critics, which).eval().requires_grad_(False)
        return cls(net, which, spec, str(path or "embedded"))

    def _digit(self, c) -> int:
        text = str(c).strip()
        if not text.isdigit() or not 0 <= int(text) <= 9:
            raise CriticError(f"reward {self.spec}: field {CLASS_FIELD!r} must be a digit 0..9, got {c!r}")
        return int(text)

    def _digits(self, prompts, fields) -> list[int]:
        return [self._digit(c) for c in field_classes(fields, prompts, f"reward {self.spec}")]

    def _prepare(self, images):
        return images.to(model_dtype(self.net))  # (the nets resize and grey the images themselves)

    def score(self, images, prompts, fields):
        index = self._digits(prompts, fields)
        logp = torch.log_softmax(self.net(self._prepare(images)), dim=-1)
        return logp.gather(1, torch.tensor(index, device=logp.device)[:, None]).squeeze(1)

    def features(self, images):
        return self.net.features(self._prepare(images))

    @torch.no_grad()
    def accuracy(self, images, prompts, fields) -> torch.Tensor:
        """(B,) 1.0 where the classifier's arg-max is the prompt's digit, else 0.0."""
        index = torch.tensor(self._digits([str(p) for p in prompts], list(fields)), device=images.device)
        return (self.net(self._prepare(images)).argmax(-1) == index).float()

    def describe(self) -> dict:
        return {"kind": f"digits-{self.which}", "spec": self.spec, "model": self.path, "field": CLASS_FIELD}


def _builder(which: str):
    def build(parsed, device, what):
        return DigitsReward.from_folder(parsed.target, which, parsed.text, device)
    return build


#: the reward kinds of the digits model, as ``load_rewards(..., kinds=DIGIT_REWARDS)`` takes them
DIGIT_REWARDS = {"digits-guide": _builder("guide"), "digits-judge": _builder("judge")}
