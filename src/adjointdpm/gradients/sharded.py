"""Reverse passes that reach sharded weights (FSDP2's DTensor parameters).

The engine and the fine-tuning methods pull cotangents back with ``torch.autograd.backward(…, inputs=…)``
naming exactly the tensors whose gradients they want. Under FSDP2 (``torch.distributed.fsdp.fully_shard``)
a module's parameters are sharded DTensors that its forward never reads: each forward all-gathers them into
unsharded tensors, and FSDP2's post-backward hooks reduce-scatter those tensors' gradients into the sharded
``p.grad``. Naming the sharded parameters in ``inputs=`` therefore computes nothing for them, silently.

When any wanted tensor is a DTensor, :func:`backward_to` makes the pass without ``inputs=``: autograd reaches
the unsharded weights, FSDP2 reduce-scatters their gradient into the sharded ``p.grad`` (vᵀ∂Φ/∂θ, summed
over the processes by the modules' gradient divide factor), and the other wanted leaves get theirs as
before. Such a pass also accumulates into any other leaf of the graph that requires grad: the callers' graphs
hold only their own fresh leaf copies and the network's trainable weights (which ``sample`` and the methods
all want), so a frozen reward model or classifier stays untouched; one with ``requires_grad`` weights would
receive gradients too.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch


def is_sharded(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether any tensor is a DTensor (FSDP2's sharded parameters; none exists before that module is loaded)."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors)


def backward_to(outputs, cotangents, inputs: Sequence[torch.Tensor], sharded: bool | None = None) -> None:
    """``torch.autograd.backward(outputs, cotangents, inputs=inputs)``, made without ``inputs=`` when some
    input is sharded (see the module docstring). ``sharded``: the answer of :func:`is_sharded`, if known."""
    if sharded is None:
        sharded = is_sharded(inputs)
    if sharded:
        torch.autograd.backward(outputs, cotangents)
    else:
        torch.autograd.backward(outputs, cotangents, inputs=list(inputs))
