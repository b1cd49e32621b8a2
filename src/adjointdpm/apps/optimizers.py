"""Optimisers of per-sample tensors (noises) shared by the applications.

:class:`NormalizedSteps`: x_b ← x_b − lr · g_b / rms(g_b), the RMS taken per sample b (over all but the first
dimension) of each tensor — every sample moves by the same RMS whatever the scale of its gradient (audit's
attack steps; guide's default)."""

from __future__ import annotations

import torch

from .errors import UserInputError


class NormalizedSteps(torch.optim.Optimizer):
    """x ← x − lr · g / rms(g), the RMS taken per sample (over all but the first dimension) of each tensor.

    A sample whose gradient is exactly zero (a frozen one) does not move."""

    def __init__(self, params, lr: float):
        if lr <= 0:
            raise UserInputError(f"the step size must be > 0, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                rms = g.flatten(1).pow(2).mean(1).sqrt().view(-1, *([1] * (g.dim() - 1)))
                p.sub_(group["lr"] * torch.where(rms > 0, g / rms.clamp_min(1e-30), torch.zeros_like(g)))
