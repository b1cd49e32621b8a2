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

Half-precision tensors (float16/bfloat16 weights or embeddings) accumulate in float32: after each step
their fresh ``.grad`` is folded into a float32 buffer, so N steps cost one rounding, not N. (With
``torch.autocast`` the weights stay float32 and accumulate in place as above.)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


LOW_PRECISION = (torch.float16, torch.bfloat16)


def _leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().requires_grad_(t.requires_grad)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision tensors, the tensor's own dtype otherwise."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


class VJPAccumulator:
    """Context manager holding the conditioning leaves and the parameters' private gradient buffers."""

    def __init__(self, cond: torch.Tensor | None, uncond: torch.Tensor | None, params: Sequence[torch.Tensor]):
        self.cond, self.uncond = _leaf(cond), _leaf(uncond)
        self.params = list(params)
        self.param_grads: list[torch.Tensor | None] = [None] * len(self.params)
        self._targets = [t for t in (self.cond, self.uncond) if t is not None and t.requires_grad] + self.params
        # float32 buffers of the half-precision targets, by position in _targets
        self._wide = {i: None for i, t in enumerate(self._targets) if t.dtype in LOW_PRECISION}

    def __enter__(self) -> "VJPAccumulator":
        self._saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return self

    def __exit__(self, *exc) -> None:
        grads = self._collected()
        offset = len(self._targets) - len(self.params)
        self.param_grads = grads[offset:]
        for p, saved in zip(self.params, self._saved):
            p.grad = saved

    def _fold_low_precision(self) -> None:
        for i, buffer in self._wide.items():
            target = self._targets[i]
            if target.grad is not None:
                self._wide[i] = target.grad.float() if buffer is None else buffer.add_(target.grad)
                target.grad = None

    def _collected(self) -> list[torch.Tensor | None]:
        return [self._wide[i] if i in self._wide else t.grad for i, t in enumerate(self._targets)]

    def _grad_of(self, leaf: torch.Tensor | None) -> torch.Tensor | None:
        if leaf is None or not leaf.requires_grad:
            return None
        index = next(i for i, t in enumerate(self._targets) if t is leaf)
        return self._collected()[index]

    @property
    def cond_grad(self) -> torch.Tensor | None:
        return self._grad_of(self.cond)

    @property
    def uncond_grad(self) -> torch.Tensor | None:
        return self._grad_of(self.uncond)

    def vjp(
        self,
        fn: Callable[..., Sequence[torch.Tensor]],
        primals: Sequence[torch.Tensor],
        cotangents: Sequence[torch.Tensor | None],
        target_weight: float | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Run ``fn(*primals, cond, uncond)`` with a graph and pull ``cotangents`` back through it.

        Returns the (detached) outputs and the cotangents of the primals (None where unreached).
        Conditioning and parameter cotangents accumulate into their buffers, scaled by
        ``target_weight`` if given (a second reverse pass through the retained graph).
        """
        leaves = [p.detach().requires_grad_() for p in primals]
        with torch.enable_grad():
            outputs = list(fn(*leaves, self.cond, self.uncond))
        pairs = [(o, v) for o, v in zip(outputs, cotangents) if v is not None and o.requires_grad]
        if pairs:
            outs, vs = [o for o, _ in pairs], [v.to(o.dtype) for o, v in pairs]
            if target_weight is None:
                torch.autograd.backward(outs, vs, inputs=leaves + self._targets)
            else:
                torch.autograd.backward(outs, vs, inputs=leaves, retain_graph=bool(self._targets))
                if self._targets:
                    torch.autograd.backward(outs, [target_weight * v for v in vs], inputs=self._targets)
            self._fold_low_precision()
        return [o.detach() for o in outputs], [leaf.grad for leaf in leaves]
