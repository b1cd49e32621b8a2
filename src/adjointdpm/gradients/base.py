"""Gradient modes: how ``sample`` differentiates the sampler.

A mode is a small frozen dataclass with ``run(solver, x_T, cond, uncond, params) -> x_0``.

* Modes built on autograd (``Backprop``, ``Checkpoint``, ``Truncated``) run the step loop under autograd.
* Modes with their own backward pass (``Exact``, ``Adjoint``) implement ``record`` (a forward pass without a
  graph that keeps what their backward needs) and ``pull_back`` (the backward pass). ``SamplerFunction``
  wraps them in one ``torch.autograd.Function`` whose inputs are x_T, the embeddings and the weights,
  so ``loss.backward()`` fills every ``.grad`` and ``torch.autograd.grad`` works too.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..solvers import Solver
from ._vjp import VJPAccumulator


class GradMode:
    """Base class of the gradient modes."""

    name = "mode"

    def run(self, solver: Solver, x_T, cond, uncond, params: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class CustomBackwardMode(GradMode):
    """A mode whose backward pass walks the sampler itself (no autograd graph across steps)."""

    def record(self, solver: Solver, x_T, cond, uncond) -> tuple[torch.Tensor, Any]:
        """Sample without a graph; return x_0 and what ``pull_back`` needs."""
        raise NotImplementedError

    def pull_back(self, solver: Solver, record: Any, grad_x0: torch.Tensor, acc: VJPAccumulator) -> torch.Tensor:
        """Given ∂L/∂x_0, return ∂L/∂x_T; accumulate conditioning and weight cotangents into ``acc``."""
        raise NotImplementedError

    def run(self, solver, x_T, cond, uncond, params):
        return SamplerFunction.apply(self, solver, x_T, cond, uncond, *params)


class SamplerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mode: CustomBackwardMode, solver: Solver, x_T, cond, uncond, *params):
        with torch.no_grad():
            x0, record = mode.record(solver, x_T.detach(), _detach(cond), _detach(uncond))
        # The backward pass recomputes steps: it must see the autocast state the forward pass saw.
        device_type = x_T.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.mode, ctx.solver, ctx.record = mode, solver, record
        ctx.cond, ctx.uncond, ctx.params = cond, uncond, params
        return x0

    @staticmethod
    def backward(ctx, grad_x0):
        _check_incoming(grad_x0)
        needs = ctx.needs_input_grad
        params = [p for p, need in zip(ctx.params, needs[5:]) if need]
        cond = ctx.cond.detach().requires_grad_(needs[3]) if ctx.cond is not None else None
        uncond = ctx.uncond.detach().requires_grad_(needs[4]) if ctx.uncond is not None else None
        device_type, enabled, dtype = ctx.autocast
        with VJPAccumulator(cond, uncond, params) as acc, torch.autocast(device_type, dtype, enabled=enabled):
            grad_xT = ctx.mode.pull_back(ctx.solver, ctx.record, grad_x0, acc)
        grads = iter(acc.param_grads)
        param_grads = [next(grads) if need else None for need in needs[5:]]
        ctx.record = None  # free the stored states as soon as possible
        return (None, None, grad_xT if needs[2] else None, acc.cond_grad, acc.uncond_grad, *param_grads)


def _detach(t):
    return None if t is None else t.detach()


def check_step_cotangent(cotangent: torch.Tensor, step: int, t: float) -> None:
    """Stop the backward pass at the sampling step where a non-finite cotangent first appears."""
    if not torch.isfinite(cotangent).all():
        raise FloatingPointError(
            f"the gradient became NaN or inf in the backward pass through sampling step {step} (model time {t:g}); "
            "the network's backward at that time overflowed or divided by zero — try float32, a smaller "
            "guidance scale, or check custom layers"
        )


def _check_incoming(grad_x0: torch.Tensor) -> None:
    if not torch.isfinite(grad_x0).all():
        raise FloatingPointError(
            "the gradient of the loss with respect to the sample contains NaN or inf; "
            "check the loss for log(0), division by zero or overflow (try float32/float64)"
        )
