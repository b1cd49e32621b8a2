"""The reward contract, and the weighted sum that ``--reward`` repeated builds.

A reward r maps a batch of images x (B, 3, H, W) in [-1, 1], their prompts and each prompt's fields (the
extra keys of a .jsonl prompt line, e.g. ``class``) to per-image scores r(x) of shape (B,), to be
*maximised*, differentiable w.r.t. x (the reward model's own weights are frozen). ``features(x)`` gives
per-image feature vectors where they mean something (the embeddings the diversity of a judge is measured
in), else None. ``describe()`` is JSON-able (it goes into a run's summary).

``RewardSum`` is R(x) = Σ_i w_i r_i(x), what ``--reward`` given several times optimises.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..critics.errors import CriticError


def model_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's first floating parameter (float32 when it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def batch_fields(fields: Sequence[dict] | None, b: int) -> list[dict]:
    """``fields`` checked to hold one dict per image (None: B empty dicts)."""
    if fields is None:
        return [{} for _ in range(b)]
    fields = list(fields)
    if len(fields) != b or not all(isinstance(f, dict) for f in fields):
        raise CriticError(f"a reward takes one dict of prompt fields per image: got {len(fields)} for {b} images")
    return fields


class Reward(torch.nn.Module):
    """Base class: subclasses implement ``score`` (and ``features`` where meaningful); calling checks the
    inputs and the (B,) shape of the result."""

    kind = "reward"

    def __init__(self, spec: str):
        super().__init__()
        self.spec = spec

    def score(self, images: torch.Tensor, prompts: list[str], fields: list[dict]) -> torch.Tensor:
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> torch.Tensor | None:
        """(B, D) features of the images, or None when this reward has none."""
        return None

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec}

    def forward(self, images: torch.Tensor, prompts: Sequence[str], fields: Sequence[dict] | None = None) -> torch.Tensor:
        if images.dim() != 4:
            raise CriticError(f"reward {self.spec}: images must be (B, C, H, W), got {tuple(images.shape)}")
        b = images.shape[0]
        prompts = [str(p) for p in prompts]
        if len(prompts) != b:
            raise CriticError(f"reward {self.spec}: {len(prompts)} prompts for {b} images (give one prompt per image)")
        out = self.score(images, prompts, batch_fields(fields, b))
        if tuple(out.shape) != (b,):
            raise CriticError(f"reward {self.spec} returned shape {tuple(out.shape)} for {b} images: it must be ({b},)")
        return out


class RewardSum(Reward):
    """R = Σ_i w_i r_i over the ``(weight, reward)`` terms; ``terms(...)`` also returns each r_i (for logs)."""

    kind = "sum"

    def __init__(self, terms: Sequence[tuple[float, Reward]]):
        if not terms:
            raise CriticError("no reward given: name at least one with --reward (e.g. --reward clip:FOLDER)")
        super().__init__(" + ".join(f"{w:g}*{r.spec}" for w, r in terms))
        self.weights = [float(w) for w, _ in terms]
        self.rewards = torch.nn.ModuleList([r for _, r in terms])

    def terms(self, images: torch.Tensor, prompts: Sequence[str],
              fields: Sequence[dict] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(R(x), {spec_i: r_i(x)}), each (B,) (a SPEC given twice is keyed ``SPEC#2`` the second time)."""
        values = {}
        total = 0
        for w, r in zip(self.weights, self.rewards):
            v = r(images, prompts, fields)
            key, n = r.spec, 1
            while key in values:
                n += 1
                key = f"{r.spec}#{n}"
            values[key] = v
            total = total + w * v
        return total, values

    def score(self, images, prompts, fields):
        return self.terms(images, prompts, fields)[0]

    def features(self, images):
        for r in self.rewards:
            f = r.features(images)
            if f is not None:
                return f
        return None

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec,
                "terms": [{"weight": w, **r.describe()} for w, r in zip(self.weights, self.rewards)]}
