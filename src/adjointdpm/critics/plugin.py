"""Plug-in objectives: ``--loss FILE.py:FUNC`` or ``--loss package.module:FUNC``.

The contract of a plug-in loss::

    def my_loss(images, *, prompts, indices) -> torch.Tensor:
        # images: (B, 3, H, W) float32 in [-1, 1], differentiable (the sampler's output, decoded)
        # prompts: the B prompts of the batch; indices: the B sample indices (ints) within the run
        return per_image_losses  # (B,) or a scalar, to be minimised

The keyword context is passed only as far as the function accepts it (``**context`` takes all;
``def f(images)`` gets none). :class:`CheckedLoss` checks the first call: the result must be a tensor of
shape (B,) or (), finite, and its gradient must reach the images (a ``.detach()``, ``torch.no_grad()``
or a round trip through numpy cuts it). Each failure is one :class:`CriticError` line naming the cause.
The check back-propagates once from the loss to a detached copy of the images (the critic only, never
the sampler).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

import torch

from .errors import CriticError

CONTEXT = ("prompts", "indices")


def load_function(spec: str, what: str = "--loss") -> Callable:
    """``FILE.py:FUNC`` (a file path) or ``package.module:FUNC`` (importable) -> the function (``what``: the
    option named in errors)."""
    where, sep, name = str(spec).rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise CriticError(f"{what} {spec!r}: write FILE.py:FUNC or package.module:FUNC")
    if where.endswith(".py") or "/" in where or Path(where).expanduser().is_file():
        path = Path(where).expanduser()
        if not path.is_file():
            raise CriticError(f"{what} {spec!r}: the file {path} does not exist")
        mod_name = f"adjointdpm_loss_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's file: one line about what went wrong
            sys.modules.pop(mod_name, None)
            raise CriticError(f"{what} {spec!r}: importing {path} raised {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:  # noqa: BLE001
            raise CriticError(f"{what} {spec!r}: cannot import {where} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise CriticError(f"{what} {spec!r}: {where} has no function {name}")
    return fn


def accepted_keywords(fn: Callable, context: tuple[str, ...] = CONTEXT) -> tuple[str, ...] | None:
    """The keywords of ``context`` that ``fn`` takes (None: all of them, through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return tuple(k for k in context if k in names)


class CheckedLoss:
    """A plug-in loss with the contract checked at its first call; returns per-image losses (B,)."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name = fn, name
        self.accepts = accepted_keywords(fn)
        self.checked = False

    @classmethod
    def from_spec(cls, spec: str) -> "CheckedLoss":
        return cls(load_function(spec), spec)

    def _call(self, images: torch.Tensor, context: dict):
        kwargs = context if self.accepts is None else {k: v for k, v in context.items() if k in self.accepts}
        try:
            return self.fn(images, **kwargs)
        except Exception as e:  # noqa: BLE001 - the user's code: one line, exit 2
            raise CriticError(f"--loss {self.name} raised {type(e).__name__}: {e}") from None

    def check(self, images: torch.Tensor, context: dict) -> None:
        """The contract, on a detached copy of ``images`` (so the sampler is never back-propagated)."""
        probe = images.detach().float().clone().requires_grad_(True)
        with torch.enable_grad():
            out = self._call(probe, context)
            b = images.shape[0]
            if not isinstance(out, torch.Tensor):
                raise CriticError(f"--loss {self.name} returned {type(out).__name__}, not a torch tensor: "
                                  "return a (B,) tensor of per-image losses or a scalar tensor")
            if tuple(out.shape) not in ((b,), ()):
                raise CriticError(f"--loss {self.name} returned shape {tuple(out.shape)} for {b} images: "
                                  f"return per-image losses of shape ({b},) or a scalar")
            if not bool(torch.isfinite(out.detach()).all()):
                raise CriticError(f"--loss {self.name} returned non-finite values ({out.detach().flatten()[:4].tolist()}) "
                                  "at the first call: guard divisions and logarithms")
            if not out.requires_grad:
                raise CriticError(f"--loss {self.name} does not depend differentiably on the images: no gradient "
                                  "reaches them (a .detach(), torch.no_grad() or a numpy round trip cuts the graph)")
            (grad,) = torch.autograd.grad(out.float().sum(), probe, allow_unused=True)
            if grad is None:
                raise CriticError(f"--loss {self.name}: no gradient reaches the images (a .detach(), "
                                  "torch.no_grad() or a numpy round trip cuts the graph)")
        self.checked = True

    def __call__(self, images: torch.Tensor, *, prompts: list[str], indices: list[int]) -> torch.Tensor:
        images = images.float()
        context = {"prompts": list(prompts), "indices": [int(i) for i in indices]}
        if not self.checked:
            self.check(images, context)
        out = self._call(images, context).float()
        return out.expand(images.shape[0]) if out.dim() == 0 else out
