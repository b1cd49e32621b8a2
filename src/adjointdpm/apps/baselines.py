"""Baselines that are not engine gradient modes.

One-step x̂₀ guidance (``--grad onestep``). At every step i of the sampler, the loss is evaluated on the
one-step denoised estimate x̂₀_i = (x_i − σ_i ε̂(x_i, t_i, c; θ))/α_i and differentiated through that
one network call only — never through the chain of steps (the "forward universal guidance" /
DPS-without-the-chain family). As an optimiser it gives, for every optimised tensor,

    g = (1/N) Σ_i ∂L(x̂₀_i)/∂(c, θ)            (conditioning, weights: through call i)
    g_x = (1/N) Σ_i (c_i/c_0) ∂L(x̂₀_i)/∂x_i     (the starting state: x_i is reached from x_0 through
                                                  the linear part of the flow only, as in Truncated)

The trajectory itself is the plain sampler's (no graph), so the images, the reported loss and the
success checks are those of the actual samples. Each step is back-propagated as soon as it is built,
so memory holds one call's activations. Cost: N forward (trajectory) + N forward and N backward.

Truncated backprop (K = 1), naive backprop and checkpointing are engine modes (``--grad truncated``,
``backprop``, ``checkpoint``). :func:`resolve_grad` reads ``--grad``: the engine's modes
(:func:`adjointdpm.gradients.resolve_grad_mode`) and this module's ``onestep``.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..gradients import GRAD_MODES, GradMode, resolve_grad_mode
from .errors import UserInputError
from .options import GRAD_CHOICES


class OneStep:
    """Marker for the one-step x̂₀ baseline (not an engine mode: see :func:`onestep_backward`)."""

    name = "onestep"

    def __repr__(self) -> str:
        return "OneStep()"


def resolve_grad(spec: str) -> GradMode | OneStep:
    """``--grad``: 'exact', 'adjoint', 'adjoint-stored', 'adjoint:steps=5,state=stored', 'truncated:k=2',
    'onestep', … (the engine reads every spec but 'onestep')."""
    name = str(spec).strip().partition(":")[0]
    if name == "onestep":
        if str(spec).strip().partition(":")[2].strip():
            raise UserInputError("--grad onestep takes no options")
        return OneStep()
    if name not in GRAD_MODES and name != "adjoint-stored":
        raise UserInputError(f"unknown --grad {spec!r}; use one of {', '.join(GRAD_CHOICES)}")
    try:
        return resolve_grad_mode(str(spec))
    except ValueError as e:
        raise UserInputError(f"--grad {spec!r}: {e}") from None


def grad_label(mode) -> str:
    """A short stable name of a gradient mode for tables and JSON (e.g. 'adjoint', 'truncated(k=1)')."""
    if isinstance(mode, OneStep):
        return "onestep"
    from dataclasses import fields

    args = [f"{f.name}={getattr(mode, f.name)}" for f in fields(mode)
            if getattr(mode, f.name) != f.default]
    if mode.name == "truncated":
        return f"truncated(k={mode.k})"
    return mode.name + (f"({', '.join(args)})" if args else "")


def onestep_backward(session, x_start: torch.Tensor, cond: torch.Tensor, objective: Callable, weights: torch.Tensor,
                     *, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Back-propagate the one-step x̂₀ surrogate into x_start, cond and the weights' ``.grad``.

    Returns the per-sample losses of the actual samples and x_0 (both detached).
    """
    # Non-leaf inputs (e.g. a slice of the optimised tensor) are back-propagated once, at the end: the
    # per-step passes accumulate into leaf copies.
    if not isinstance(cond, torch.Tensor):
        raise UserInputError("--grad onestep supports tensor conditioning (SD 1.x/2.x folders and the embedded "
                             "model); use --grad exact for this model")
    pending = []
    if x_start.requires_grad and x_start.grad_fn is not None:
        pending.append((x_start, x_start.detach().requires_grad_(True)))
        x_start = pending[-1][1]
    if cond.requires_grad and cond.grad_fn is not None:
        pending.append((cond, cond.detach().requires_grad_(True)))
        cond = pending[-1][1]
    sampler = session.sampler(start)
    grid, n = sampler.grid, sampler.num_steps
    uncond = sampler.guided(session.uncond)
    *states, x0 = sampler.trajectory(x_start.detach(), cond.detach(), uncond)
    with torch.no_grad():
        per_sample = objective(x0).detach()
    scale0 = grid.scale_at(0)
    for i, x_i in enumerate(states):
        x_in = x_i
        if x_start.requires_grad:
            x_in = x_i + (grid.input_scale * grid.scale_at(i) / scale0) * (x_start - x_start.detach())
        with torch.enable_grad():
            _, x0_hat = sampler.predict(i, x_in, cond, uncond)
            loss = (objective(x0_hat) * weights.to(x0_hat.dtype)).sum() / n
        if loss.requires_grad:
            loss.backward()
    outs = [(orig, leaf.grad) for orig, leaf in pending if leaf.grad is not None]
    if outs:
        torch.autograd.backward([o for o, _ in outs], [g for _, g in outs])
    return per_sample, x0
