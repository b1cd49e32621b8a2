"""The lean adjoint of Adjoint Matching: the discrete adjoint of the base model's memoryless chain.

With the injected noises held fixed, the chain X_{k+1} = μ_base(X_k) + s_k ξ_k is a composition of maps,
and the cotangent of −λ r(X_K) walks back through it:

    ã_K = −λ ∇r(X_K),      ã_k = J_{μ_base}(X_k)ᵀ ã_{k+1}        (k = K−1 … 0)

— the engine's exact discrete adjoint with the state as the only input: one network evaluation with a graph
and one VJP per step, with respect to X_k only (no weight cotangents), so memory holds the K + 1 stored
states and one step's activations, flat in K. X_k are the states the *current* model sampled; the
Jacobians are the base model's at those states (Adjoint Matching's "lean" adjoint: no control terms).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..gradients.base import check_step_cotangent
from .memoryless import MemorylessChain


def lean_adjoint(chain: MemorylessChain, base_denoiser, states: Sequence[torch.Tensor], terminal: torch.Tensor,
                 cond, need_adjoint: set[int], need_mean: set[int] = frozenset(), uncond=None):
    """ã_k for k in ``need_adjoint`` and μ_base(X_k) for k in ``need_mean``.

    ``states`` are X_0 … X_K, ``terminal`` is ã_K; ``uncond`` is given when the base chain is guided. The walk stops at the lowest k whose adjoint is needed;
    a mean needed below it costs one forward without a graph. Returns (adjoints, means) as dicts by k.
    """
    num = chain.num_steps
    if len(states) != num + 1:
        raise ValueError(f"lean_adjoint needs the {num + 1} states X_0 … X_K, got {len(states)}")
    lowest = min(need_adjoint) if need_adjoint else num
    adjoints, means = {}, {}
    a = terminal.detach()
    if num in need_adjoint:
        adjoints[num] = a
    for k in reversed(range(lowest, num)):
        x = states[k].detach().requires_grad_()
        with torch.enable_grad():
            mu = chain.mean(k, x, base_denoiser, cond, uncond)
            (a,) = torch.autograd.grad(mu, x, grad_outputs=a.to(mu.dtype))
        check_step_cotangent(a, k, float(chain.grid.t[k]))
        if k in need_mean:
            means[k] = mu.detach()
        if k in need_adjoint:
            adjoints[k] = a
        del mu, x
    with torch.no_grad():
        for k in sorted(need_mean):
            if k not in means:
                means[k] = chain.mean(k, states[k], base_denoiser, cond, uncond)
    return adjoints, means
