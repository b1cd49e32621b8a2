"""Vector–Jacobian products of one sampler step, accumulated straight into gradient buffers.

Both adjoints walk the sampler backwards and, at each step, need  vᵀ ∂Φ/∂(x, h, c, θ)  for a cotangent v.
One reverse pass per step does it: the step is recomputed with a graph from detached leaf copies of
its inputs, and ``torch.autograd.backward(outputs, v, inputs=…)`` accumulates

    x-leaf.grad  = vᵀ ∂Φ/∂x        (returned, it is the next cotangent)
    cond-leaf.grad += vᵀ ∂Φ/∂c     (one buffer for the whole backward pass)
    p.grad       += vᵀ ∂Φ/∂θ       (in place, layer by layer: never a parameter-sized temporary)

While the pass runs, each parameter's user-visible ``.grad`` is set aside so that the accumulated sum is
exactly this sampler's contribution; the sum is then handed back to autograd (which adds it to the
user's ``.grad``, or to the result of ``torch.autograd.grad``) and the user's buffer is restored.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def _leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().requires_grad_(t.requires_grad)


class VJPAccumulator:
    """Context manager holding the conditioning leaves and the parameters' private gradient buffers."""

    def __init__(self, cond: torch.Tensor | None, uncond: torch.Tensor | None, params: Sequence[torch.Tensor]):
        self.cond, self.uncond = _leaf(cond), _leaf(uncond)
        self.params = list(params)
        self.param_grads: list[torch.Tensor | None] = [None] * len(self.params)
        self._targets = [t for t in (self.cond, self.uncond) if t is not None and t.requires_grad] + self.params

    def __enter__(self) -> "VJPAccumulator":
        self._saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return self

    def __exit__(self, *exc) -> None:
        self.param_grads = [p.grad for p in self.params]
        for p, saved in zip(self.params, self._saved):
            p.grad = saved

    @property
    def cond_grad(self) -> torch.Tensor | None:
        return None if self.cond is None else self.cond.grad

    @property
    def uncond_grad(self) -> torch.Tensor | None:
        return None if self.uncond is None else self.uncond.grad

    def vjp(
        self,
        fn: Callable[..., Sequence[torch.Tensor]],
        primals: Sequence[torch.Tensor],
        cotangents: Sequence[torch.Tensor | None],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Run ``fn(*primals, cond, uncond)`` with a graph and pull ``cotangents`` back through it.

        Returns the (detached) outputs and the cotangents of the primals (None where unreached).
        Conditioning and parameter cotangents accumulate into their buffers.
        """
        leaves = [p.detach().requires_grad_() for p in primals]
        with torch.enable_grad():
            outputs = list(fn(*leaves, self.cond, self.uncond))
        pairs = [(o, v) for o, v in zip(outputs, cotangents) if v is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward(
                [o for o, _ in pairs], [v.to(o.dtype) for o, v in pairs], inputs=leaves + self._targets
            )
        return [o.detach() for o in outputs], [leaf.grad for leaf in leaves]
