"""The budget of a run, counted in model calls: every forward call of the denoiser and every backward pass
through its outputs, counted by hooks, so every gradient mode is charged what it really costs (a
checkpoint's recomputation is charged when it starts, even if it stops before returning)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

class CallCounter:
    """Counts forward calls of the given networks and the backward passes through their outputs."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.forward = 0
        self.backward = 0
        self.enabled = True
        # forwards are counted when they start: a checkpoint's recomputation stops early, before the
        # forward returns, and must still be charged
        self._handles = [m.register_forward_pre_hook(self._on_call) for m in modules]
        self._handles += [m.register_forward_hook(self._on_forward) for m in modules]

    def _on_call(self, module, args):
        if self.enabled:
            self.forward += 1

    def _on_forward(self, module, args, output):
        if not self.enabled:
            return
        out = output
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        out = getattr(out, "sample", out)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._on_backward)

    def _on_backward(self, grad):
        if self.enabled:
            self.backward += 1

    @property
    def total(self) -> int:
        return self.forward + self.backward

    @contextmanager
    def paused(self):
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
