"""What the applications optimise and evaluate, as protocols: one signature each, implemented over critic
folders and plug-in losses (:mod:`.folder_objectives`) and by the embedded digits model
(:mod:`adjointdpm.embedded.digit_objectives`). The applications type their objectives with these and never
import an implementation's module.

Images are (B, C, H, W) in [-1, 1]; losses are per image, (B,), minimised; ``describe()`` gives the JSON-able
entries a run's summary.json records about the objective.

* :class:`Target`  guide's objective (and stylize's / invert's with ``--loss``): a critic's class, a CLIP text,
  a plug-in loss, a digit;
* :class:`Judge`   evaluation only, never optimised (``--judge``);
* :class:`Attack`  audit's: which samples are attacked and with what label, the loss that moves them, success;
* :class:`Style`   stylize's: a style loss calibrated on the untuned model's images;
* :class:`Loss`    invert's plug-in replacement of the distance to targets.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Target(Protocol):
    """guide: what the images should show. ``default_views`` / ``default_stop_loss`` are guide's
    ``--views`` / ``--stop-loss`` when not given."""

    default_views: int
    default_stop_loss: float

    def describe(self) -> dict: ...

    def loss(self, images: torch.Tensor, *, prompts: list[str], indices: list[int]) -> torch.Tensor: ...

    def hits(self, images: torch.Tensor) -> torch.Tensor | None:
        """Per image: does the optimised critic see the target? (None: it has no such notion)."""

    def metrics(self, images: torch.Tensor) -> dict: ...


@runtime_checkable
class Judge(Protocol):
    """An independent critic, never optimised: its metrics of a state (accuracy for ``labels`` if given)."""

    def describe(self) -> dict: ...

    def metrics(self, images: torch.Tensor, *, prompts: list[str] | None = None,
                labels: torch.Tensor | None = None) -> dict: ...


@runtime_checkable
class Attack(Protocol):
    """audit: ``setup`` labels the original images and says which are attacked (``valid``); ``loss`` is minimised
    by the attacked images; ``success`` says which attacked images reached the goal."""

    name: str
    none_valid: str  # how to say that no sample was attackable ("none of the N samples is one <none_valid>")

    def prompts(self, settings: dict, n: int, prompt: str | None = None) -> list[str]: ...

    def setup(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def loss(self, images: torch.Tensor, label: torch.Tensor) -> torch.Tensor: ...

    def success(self, images: torch.Tensor, label: torch.Tensor) -> torch.Tensor: ...

    def metrics(self, images: torch.Tensor, label: torch.Tensor, valid: torch.Tensor) -> dict: ...


@runtime_checkable
class Style(Protocol):
    """stylize: ``calibrate`` on the untuned model's training images (their loss becomes the unit), then a
    per-image loss of the pool's images ``indices``."""

    def describe(self) -> dict: ...

    def calibrate(self, train_images: torch.Tensor) -> None: ...

    def loss(self, images: torch.Tensor, *, prompts: list[str], indices: list[int]) -> torch.Tensor: ...

    def metrics(self, images: torch.Tensor) -> dict: ...


@runtime_checkable
class Loss(Protocol):
    """invert with ``--loss``: a loss of the images and their prompts, and its value as a metric."""

    def describe(self) -> dict: ...

    def loss(self, images: torch.Tensor, *, prompts: list[str], indices: list[int]) -> torch.Tensor: ...

    def metrics(self, images: torch.Tensor, prompts: list[str] | None = None) -> dict: ...
