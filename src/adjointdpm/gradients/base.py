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

from ..conditioning import floating_leaves, map_floating, replace_floating
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

    def run(self, solver, x_T, cond, uncond, params, stand_ins=None):
        """``stand_ins``: the leaf tensors the solver reads in place of ``params`` (same order; default:
        ``params`` themselves). The backward pass accumulates into leaves only, so a tensor computed from
        others (a row slice of an optimised noise) reaches the solver as a detached leaf copy, and its
        gradient is handed back to autograd as the gradient of the original, which carries it on."""
        # autograd.Function sees tensors only at the top level: the conditioning trees travel as their
        # floating leaves and are rebuilt inside.
        cond_leaves, uncond_leaves = floating_leaves(cond), floating_leaves(uncond)
        stand_ins = tuple(params if stand_ins is None else stand_ins)
        if len(stand_ins) != len(params):
            raise ValueError(f"stand_ins has {len(stand_ins)} tensors for {len(params)} params: give one per entry")
        if any(not t.is_leaf for t in stand_ins):
            raise ValueError(
                f"a tensor in params is computed from other tensors (not a leaf), and grad={self.name!r} "
                "accumulates into leaf tensors: pass the leaf it is computed from, or use grad='backprop'"
            )
        layout = (cond, uncond, len(cond_leaves), len(uncond_leaves), stand_ins)
        return SamplerFunction.apply(self, solver, layout, x_T, *cond_leaves, *uncond_leaves, *params)


#: positions of SamplerFunction.apply's inputs before the tensors: mode, solver, layout
_LEADING = 3


class SamplerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mode: CustomBackwardMode, solver: Solver, layout, x_T, *tensors):
        cond_tree, uncond_tree, n_cond, n_uncond, stand_ins = layout
        cond = replace_floating(cond_tree, tensors[:n_cond])
        uncond = replace_floating(uncond_tree, tensors[n_cond:n_cond + n_uncond])
        with torch.no_grad():
            x0, record = mode.record(solver, x_T.detach(), map_floating(torch.Tensor.detach, cond),
                                     map_floating(torch.Tensor.detach, uncond))
        # The backward pass recomputes steps: it must see the autocast state the forward pass saw.
        device_type = x_T.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.mode, ctx.solver, ctx.record = mode, solver, record
        ctx.cond, ctx.uncond, ctx.sizes = cond, uncond, (n_cond, n_uncond)
        ctx.params = stand_ins  # what the solver reads: the accumulator's targets
        return x0

    @staticmethod
    def backward(ctx, grad_x0):
        _check_incoming(grad_x0)
        n_cond, n_uncond = ctx.sizes
        needs = ctx.needs_input_grad[_LEADING + 1:]  # after x_T: cond leaves, uncond leaves, params
        need_cond, need_uncond, need_params = needs[:n_cond], needs[n_cond:n_cond + n_uncond], needs[n_cond + n_uncond:]
        params = [p for p, need in zip(ctx.params, need_params) if need]
        cond = _with_requirements(ctx.cond, need_cond)
        uncond = _with_requirements(ctx.uncond, need_uncond)
        device_type, enabled, dtype = ctx.autocast
        with VJPAccumulator(cond, uncond, params) as acc, torch.autocast(device_type, dtype, enabled=enabled):
            grad_xT = ctx.mode.pull_back(ctx.solver, ctx.record, grad_x0, acc)
        grads = iter(acc.param_grads)
        param_grads = [next(grads) if need else None for need in need_params]
        ctx.record = None  # free the stored states as soon as possible
        x_need = ctx.needs_input_grad[_LEADING]
        return (None,) * _LEADING + (grad_xT if x_need else None, *acc.cond_grads, *acc.uncond_grads, *param_grads)


def _with_requirements(tree, needs):
    """The tree's floating tensors detached, each requiring grad exactly where autograd asks for it."""
    leaves = [t.detach().requires_grad_(need) for t, need in zip(floating_leaves(tree), needs)]
    return replace_floating(tree, leaves)


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
