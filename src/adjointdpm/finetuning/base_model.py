"""The base (pre-fine-tuning) model, which Adjoint Matching's lean adjoint and loss evaluate.

* peft ``PeftModel``: the same network inside ``network.disable_adapter()``;
* a network with peft adapter layers injected (diffusers' ``add_adapter``, ``inject_adapter_in_model``):
  the same network with every adapter layer switched off for the duration, then restored;
* full weights: a frozen copy taken when :class:`BaseModel` is made (before the first update), or the
  frozen copy the caller passes (a resumed run must pass the original weights).
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from typing import Callable

from torch import nn


def _adapter_layers(network) -> list:
    if not isinstance(network, nn.Module) or "peft" not in sys.modules:
        return []  # a network with peft layers implies peft was imported (its import is slow: not for nothing)
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in network.modules() if isinstance(m, BaseTunerLayer)]


class BaseModel:
    """``with base() as net:`` gives a network that computes the base model's output."""

    def __init__(self, network: Callable, frozen: Callable | None = None):
        self.network = network
        self.kind = "copy"
        if frozen is not None:
            self.frozen = frozen
        elif hasattr(network, "disable_adapter") and callable(network.disable_adapter):
            self.kind, self.frozen = "peft-model", None
        elif _adapter_layers(network):
            self.kind, self.frozen = "adapter-layers", None
        else:
            self.frozen = copy.deepcopy(network)
        if self.frozen is not None and isinstance(self.frozen, nn.Module):
            self.frozen.requires_grad_(False).eval()

    @contextmanager
    def __call__(self):
        if self.kind == "copy":
            yield self.frozen
            return
        # peft's switches also set requires_grad of the adapters: keep the caller's flags as they were
        flags = [(p, p.requires_grad) for p in self.network.parameters()]
        try:
            with self._adapters_off():
                yield self.network
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    @contextmanager
    def _adapters_off(self):
        if self.kind == "peft-model":
            with self.network.disable_adapter():
                yield
        else:
            layers = _adapter_layers(self.network)
            was_disabled = [layer.disable_adapters for layer in layers]
            try:
                for layer in layers:
                    layer.enable_adapters(False)
                yield
            finally:
                for layer, disabled in zip(layers, was_disabled):
                    layer.enable_adapters(not disabled)
