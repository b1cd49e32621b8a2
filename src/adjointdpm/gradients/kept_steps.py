"""A sampling step whose autograd graph is built in the forward pass and replayed in the backward pass.

``StepGraph`` runs Φ_i(x_i, h_i; c, θ) with a graph from fresh leaf copies of x_i, h_i and of the
conditioning's floating tensors (shared by every kept step of one forward pass); the weights are the
model's own parameters. In the backward pass ``replay`` stands in for the recomputation inside
``VJPAccumulator.vjp``: it is an autograd node on the accumulator's leaves (x_i, h_i, the accumulator's
conditioning leaves) whose backward pulls the cotangents through the stored graph,

    (x̄_i, h̄_i, c̄)  from  torch.autograd.backward(outputs, (x̄_{i+1}, h̄_{i+1}), inputs=(x_i, h_i, c, θ)),

hands x̄_i, h̄_i, c̄ to the accumulator as the gradients of its leaves and lets θ̄ accumulate in place in
the parameters' ``.grad`` — which, during the accumulator's pass, are its private buffers, exactly where a
recomputed step's θ̄ goes. The result is the same computation as a recomputed step, without the recompute.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..conditioning import Tree, floating_leaves, replace_floating
from .sharded import backward_to


class GraphLeaves:
    """Leaf copies of one forward pass's conditioning: every kept step's graph starts from them."""

    def __init__(self, cond: Tree, uncond: Tree):
        self.cond_leaves = [t.detach().requires_grad_() for t in floating_leaves(cond)]
        self.uncond_leaves = [t.detach().requires_grad_() for t in floating_leaves(uncond)]
        self.cond = replace_floating(cond, self.cond_leaves)
        self.uncond = replace_floating(uncond, self.uncond_leaves)

    @property
    def all(self) -> list[torch.Tensor]:
        return self.cond_leaves + self.uncond_leaves


class StepGraph:
    """Step ``i`` run with autograd: input leaves, conditioning leaves and outputs (with their graph)."""

    def __init__(self, solver, i: int, x: torch.Tensor, hist: Sequence[torch.Tensor], leaves: GraphLeaves):
        self.inputs = [t.detach().requires_grad_() for t in (x, *hist)]
        self.leaves = leaves
        with torch.enable_grad():
            x_next, hist_next = solver.step(i, self.inputs[0], tuple(self.inputs[1:]), leaves.cond, leaves.uncond)
        self.outputs = [x_next, *hist_next]
        self.params: list[torch.Tensor] = []  # the accumulator's parameters, set before the replay

    def detached_outputs(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x_next, *hist_next = (o.detach() for o in self.outputs)
        return x_next, tuple(hist_next)

    def replay(self, *rest) -> list[torch.Tensor]:
        """``fn`` for ``VJPAccumulator.vjp``: (x, *hist, cond, uncond) → the step's outputs, as a node that
        back-propagates through the stored graph."""
        n = len(self.inputs)
        cond, uncond = rest[n:]
        out = _Replay.apply(self, *rest[:n], *floating_leaves(cond), *floating_leaves(uncond))
        return list(out) if isinstance(out, tuple) else [out]


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph: StepGraph, *tensors):
        ctx.graph = graph
        ctx.set_materialize_grads(False)
        return tuple(o.detach() for o in graph.outputs)

    @staticmethod
    def backward(ctx, *grads):
        graph, ctx.graph = ctx.graph, None
        n = len(graph.inputs)
        need_cond = ctx.needs_input_grad[1 + n:]
        wanted = [leaf for leaf, need in zip(graph.leaves.all, need_cond) if need]
        pairs = [(o, g) for o, g in zip(graph.outputs, grads) if g is not None and o.requires_grad]
        if pairs:
            backward_to([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs],
                        graph.inputs + wanted + list(graph.params))
        input_grads = [t.grad for t in graph.inputs]
        cond_grads = []
        for leaf, need in zip(graph.leaves.all, need_cond):
            cond_grads.append(leaf.grad if need else None)
            leaf.grad = None  # shared by every kept step: each step hands over its own share (a pass without
            # inputs=, under FSDP2, fills the unwanted ones too: cleared alike)
        graph.outputs = graph.inputs = None  # free the graph
        return (None, *input_grads, *cond_grads)
