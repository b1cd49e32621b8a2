"""Vector–Jacobian products of one sampler step, accumulated straight into gradient buffers.

Both adjoints walk the sampler backwards and, at each step, need  vᵀ ∂Φ/∂(x, h, c, θ)  for a cotangent v.
One reverse pass per step does it: the step is recomputed with a graph from detached leaf copies of
its inputs, and ``torch.autograd.backward(outputs, v, inputs=…)`` accumulates

    x-leaf.grad  = vᵀ ∂Φ/∂x        (returned, it is the next cotangent)
    cond-leaf.grad += vᵀ ∂Φ/∂c     (one buffer per conditioning tensor, at any depth of the cond tree)
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

from ..conditioning import Tree, floating_leaves, replace_floating
from .sharded import backward_to, is_sharded


LOW_PRECISION = (torch.float16, torch.bfloat16)


def _leaf_tree(tree: Tree) -> tuple[Tree, list[torch.Tensor]]:
    """A copy of a conditioning tree whose floating tensors are fresh leaves (requires_grad kept)."""
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in floating_leaves(tree)]
    return replace_floating(tree, leaves), leaves


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision tensors, the tensor's own dtype otherwise."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


class VJPAccumulator:
    """Context manager holding the conditioning leaves and the parameters' private gradient buffers."""

    def __init__(self, cond: Tree, uncond: Tree, params: Sequence[torch.Tensor]):
        self.cond, self.cond_leaves = _leaf_tree(cond)
        self.uncond, self.uncond_leaves = _leaf_tree(uncond)
        self.params = list(params)
        self.param_grads: list[torch.Tensor | None] = [None] * len(self.params)
        embeddings = self.cond_leaves + self.uncond_leaves
        self._targets = [t for t in embeddings if t.requires_grad] + self.params
        self.sharded = is_sharded(self.params)  # FSDP2: every pass goes without inputs= (see .sharded)
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

    def _grads_of(self, leaves: list[torch.Tensor]) -> list[torch.Tensor | None]:
        collected = self._collected()
        index = {id(t): i for i, t in enumerate(self._targets)}
        return [collected[index[id(leaf)]] if leaf.requires_grad else None for leaf in leaves]

    @property
    def cond_grads(self) -> list[torch.Tensor | None]:
        """Gradients of the floating tensors of ``cond``, in ``floating_leaves`` order (None: not required)."""
        return self._grads_of(self.cond_leaves)

    @property
    def uncond_grads(self) -> list[torch.Tensor | None]:
        return self._grads_of(self.uncond_leaves)

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
                backward_to(outs, vs, leaves + self._targets, self.sharded)
            elif self.sharded:
                self._weighted_single_pass(outs, vs, target_weight)
            else:
                torch.autograd.backward(outs, vs, inputs=leaves, retain_graph=bool(self._targets))
                if self._targets:
                    torch.autograd.backward(outs, [target_weight * v for v in vs], inputs=self._targets)
            self._fold_low_precision()
        return [o.detach() for o in outputs], [leaf.grad for leaf in leaves]

    def _weighted_single_pass(self, outs, vs, target_weight: float) -> None:
        """One pass for leaves (weight 1) and targets (``target_weight``): FSDP2 frees the gathered weights
        after a pass, so a retained graph cannot be walked twice. The targets' sums are set aside, the pass
        leaves their fresh vᵀJ in ``.grad``, and the weighted sum is put back."""
        kept = [t.grad for t in self._targets]
        for t in self._targets:
            t.grad = None
        torch.autograd.backward(outs, vs)
        for t, before in zip(self._targets, kept):
            fresh = t.grad
            if fresh is None:
                t.grad = before
            else:
                fresh.mul_(target_weight)
                t.grad = fresh if before is None else before.add_(fresh)
