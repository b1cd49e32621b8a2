"""Measured cost: how many network evaluations and VJPs through them a method spent.

A forward hook on each network counts its calls (a guided call on the batched [uncond; cond] input is one
call); when a call's output carries a graph, a hook on that output counts each reverse pass through it
(a VJP). Nothing is estimated: the counts are what ran. Networks that are plain callables (not
``nn.Module``) are not counted.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def _output_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample") and isinstance(output.sample, torch.Tensor):
        return output.sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


class CallCounter:
    """Context manager counting ``forward`` calls and VJPs of the given networks."""

    def __init__(self, networks: Iterable[Callable]):
        self.networks = []
        for net in networks:
            if isinstance(net, nn.Module) and all(net is not n for n in self.networks):
                self.networks.append(net)
        self.forward = 0
        self.vjp = 0
        self._handles = []

    def _count_vjp(self, grad):
        self.vjp += 1

    def _hook(self, module, args, output):
        self.forward += 1
        out = _output_tensor(output)
        if out is not None and out.requires_grad:
            out.register_hook(self._count_vjp)

    def __enter__(self) -> "CallCounter":
        self._handles = [net.register_forward_hook(self._hook) for net in self.networks]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
