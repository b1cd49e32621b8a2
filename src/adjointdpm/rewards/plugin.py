"""Plug-in rewards: ``--reward FILE.py:FUNC`` or ``--reward package.module:FUNC``.

The contract of a plug-in reward::

    def my_reward(images, *, prompts, fields) -> torch.Tensor:
        # images: (B, 3, H, W) float32 in [-1, 1], differentiable (the sampler's output, decoded)
        # prompts: the B prompts; fields: B dicts, each prompt's fields (the other keys of its .jsonl line)
        return per_image_rewards  # (B,), to be maximised

The keywords are passed only as far as the function accepts them (``**kwargs`` takes both; ``def f(images)``
gets none). The first call is checked on a detached copy of the images: the result must be a tensor of shape
(B,), finite, and (for an optimised reward, not for a judge) its gradient must reach the images. Each
failure is one :class:`~adjointdpm.critics.errors.CriticError` line naming the cause.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..critics.errors import CriticError
from ..critics.plugin import accepted_keywords, load_function
from .base import Reward

CONTEXT = ("prompts", "fields")


class PluginReward(Reward):
    kind = "plugin"

    def __init__(self, fn: Callable, spec: str, what: str = "--reward", needs_gradient: bool = True):
        super().__init__(spec)
        self.fn, self.what, self.needs_gradient = fn, what, needs_gradient
        self.accepts = accepted_keywords(fn, CONTEXT)
        self.checked = False

    @classmethod
    def from_spec(cls, spec: str, what: str = "--reward", needs_gradient: bool = True) -> "PluginReward":
        return cls(load_function(spec, what), spec, what, needs_gradient)

    def _call(self, images, prompts, fields):
        context = {"prompts": prompts, "fields": fields}
        kwargs = context if self.accepts is None else {k: context[k] for k in self.accepts}
        try:
            return self.fn(images, **kwargs)
        except Exception as e:  # noqa: BLE001 - the user's code: one line
            raise CriticError(f"{self.what} {self.spec} raised {type(e).__name__}: {e}") from None

    def check(self, images: torch.Tensor, prompts: list[str], fields: list[dict]) -> None:
        """The contract, on a detached copy of the images (the sampler is never back-propagated here)."""
        probe = images.detach().float().clone().requires_grad_(True)
        name, b = f"{self.what} {self.spec}", images.shape[0]
        with torch.enable_grad():
            out = self._call(probe, prompts, fields)
            if not isinstance(out, torch.Tensor):
                raise CriticError(f"{name} returned {type(out).__name__}, not a torch tensor: return a ({b},) tensor")
            if tuple(out.shape) != (b,):
                raise CriticError(f"{name} returned shape {tuple(out.shape)} for {b} images: return one reward per "
                                  f"image, shape ({b},)")
            if not bool(torch.isfinite(out.detach()).all()):
                raise CriticError(f"{name} returned non-finite values ({out.detach().flatten()[:4].tolist()}): "
                                  "guard divisions and logarithms")
            if self.needs_gradient:
                grad = None
                if out.requires_grad:
                    (grad,) = torch.autograd.grad(out.float().sum(), probe, allow_unused=True)
                if grad is None:
                    raise CriticError(f"{name}: no gradient reaches the images (a .detach(), torch.no_grad(), "
                                      ".item() or a numpy round trip cuts the graph); an optimised reward must be "
                                      "differentiable")
        self.checked = True

    def score(self, images, prompts, fields):
        images = images.float()
        if not self.checked:
            self.check(images, prompts, fields)
        out = self._call(images, prompts, fields)
        if not isinstance(out, torch.Tensor):
            raise CriticError(f"{self.what} {self.spec} returned {type(out).__name__}, not a torch tensor")
        return out.float()

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "function": getattr(self.fn, "__qualname__", str(self.fn))}
