"""Methods that differentiate the reward through the sampler itself: loss = −mean_b r(x_0^b).

* ``exact``          the whole sampler's exact gradient (the engine's discrete adjoint, ``Exact(memory=…)``:
                     N stored states and one step's activations, or more graphs kept within the budget).
* ``truncated:k=K``  DRaFT-K: the gradient through the last K steps only (the engine's ``Truncated(k)``).
* ``alignprop``      AlignProp: the truncation point b is drawn per iteration and the gradient flows through
                     steps b … N−1. Their code draws b = int(N(42, 5)) for N = 50 steps, again until
                     1 ≤ b ≤ N−1; here in proportion to N: b = int(N(0.84 N, 0.10 N)), so K = N − b ≈ 8
                     of 50 (options ``mean``, ``std`` are those fractions).
* ``adjoint``        AdjointDPM's continuous adjoint (``Adjoint(state, steps, solver)``); deterministic
                     samplers only.

Each runs ``adjointdpm.sample`` with the rollout's arguments and the mode, then back-propagates into the
network's trainable parameters only (a reward model's own weights are never touched).
"""

from __future__ import annotations

import torch

from ..gradients import Adjoint, Exact, GradMode, Truncated
from ..gradients.adjoint import ADJOINT_SOLVERS, ADJOINT_STATES
from ..gradients.memory_budget import parse_memory
from ..sampling import sample
from ..solvers import solver_name
from ..stochastic import is_stochastic
from .counting import CallCounter
from .errors import MethodError
from .method import MethodBase, backward_to_params, trainable
from .rollout import Reward, Rollout, StepReport, checked_rewards


def backward_through_sampler(rollout: Rollout, reward: Reward, mode: GradMode, generator: torch.Generator,
                             stats: dict | None = None) -> StepReport:
    """x_0 = sample(…, grad=mode); add ∇_θ(−mean r(x_0)) to the trainable parameters' ``.grad``."""
    rollout = rollout.with_noise_from(generator)
    params = trainable(rollout.network)
    with CallCounter([rollout.network]) as calls:
        x0 = sample(rollout.network, rollout.x_T, grad=mode, **rollout.sample_kwargs())
        r = checked_rewards(reward, x0, need_grad=True)
        loss = -r.mean()
        backward_to_params(loss, params)
    return StepReport(r.detach(), float(loss.detach()), calls.forward, calls.vjp, dict(stats or {}))


class ExactMethod(MethodBase):
    """The full-chain gradient (our exact discrete adjoint); ``memory`` as in ``adjointdpm.Exact``."""

    name = "exact"

    def __init__(self, memory=None):
        try:
            parse_memory(memory)
        except (TypeError, ValueError) as err:
            raise MethodError(f"exact: {err}") from None
        self.memory = memory

    def options(self):
        return {} if self.memory is None else {"memory": self.memory}

    def backward(self, rollout, reward, generator):
        return backward_through_sampler(rollout, reward, Exact(memory=self.memory), generator)


class TruncatedMethod(MethodBase):
    """DRaFT-K: the gradient through the last ``k`` sampling steps."""

    name = "truncated"

    def __init__(self, k: int = 1):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise MethodError(f"truncated: k must be an integer ≥ 1 (the steps to back-propagate), got {k!r}")
        self.k = k

    def options(self):
        return {"k": self.k}

    def backward(self, rollout, reward, generator):
        return backward_through_sampler(rollout, reward, Truncated(k=self.k), generator, {"k": self.k})


class AlignPropMethod(MethodBase):
    """AlignProp: the gradient through the last K = N − b steps, b = int(Normal(mean·N, std·N)) per iteration."""

    name = "alignprop"

    def __init__(self, mean: float = 0.84, std: float = 0.10):
        if not 0.0 < float(mean) < 1.0 or float(std) < 0.0:
            raise MethodError(f"alignprop: mean must lie in (0, 1) and std be ≥ 0 (fractions of the steps), "
                              f"got mean={mean!r}, std={std!r}")
        self.mean, self.std = float(mean), float(std)

    def options(self):
        return {"mean": self.mean, "std": self.std}

    def draw_k(self, num_steps: int, generator: torch.Generator) -> int:
        """The number of final steps the gradient flows through (1 … N−1; 1 when N = 1)."""
        if num_steps < 2:
            return 1
        for _ in range(10_000):
            z = float(torch.randn((), generator=generator, dtype=torch.float64))
            b = int(self.mean * num_steps + self.std * num_steps * z)  # int() truncates, as their code does
            if 1 <= b <= num_steps - 1:
                return num_steps - b
        return num_steps - min(max(int(self.mean * num_steps), 1), num_steps - 1)

    def backward(self, rollout, reward, generator):
        k = self.draw_k(rollout.num_steps, generator)
        return backward_through_sampler(rollout, reward, Truncated(k=k), generator, {"k": k})


class ContinuousAdjointMethod(MethodBase):
    """AdjointDPM's continuous adjoint (``adjointdpm.Adjoint``): deterministic samplers only."""

    name = "adjoint"

    def __init__(self, state: str = "backsolve", steps: int | None = None, solver: str | None = None):
        if state not in ADJOINT_STATES:
            raise MethodError(f"adjoint: state must be one of {', '.join(ADJOINT_STATES)}, got {state!r}")
        if solver is not None and solver not in ADJOINT_SOLVERS:
            raise MethodError(f"adjoint: solver must be one of {', '.join(ADJOINT_SOLVERS)}, got {solver!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise MethodError(f"adjoint: steps must be an integer ≥ 1, got {steps!r}")
        self.state, self.steps, self.solver = state, steps, solver

    def options(self):
        out = {"state": self.state}
        if self.steps is not None:
            out["steps"] = self.steps
        if self.solver is not None:
            out["solver"] = self.solver
        return out

    def check_sampler(self, solver, eta=0.0):
        if is_stochastic(solver_name(solver), float(eta)):
            raise MethodError(f"method 'adjoint' integrates the probability-flow ODE and cannot take the stochastic "
                              f"sampler {solver!r}{' with eta > 0' if solver == 'ddim' else ''}: use a deterministic "
                              "solver (ddim, dpmpp2m, heun) or the method 'exact'")

    def backward(self, rollout, reward, generator):
        self.check_sampler(rollout.solver, rollout.eta)
        mode = Adjoint(state=self.state, steps=self.steps, solver=self.solver)
        return backward_through_sampler(rollout, reward, mode, generator)
