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

Each takes ``kl=β`` (default 0: off) and ``kl_steps=S``: the KL anchor of :mod:`.kl_anchor` added to the loss,
β·mean‖ε̂_θ − ε̂_base‖² at S re-noised grid points, which holds the model near the base distribution.

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
from .kl_anchor import DEFAULT_ANCHOR_STEPS, KLAnchor, check_kl
from .method import MethodBase, backward_to_params, trainable
from .rollout import Reward, Rollout, StepReport, checked_rewards


def backward_through_sampler(rollout: Rollout, reward: Reward, mode: GradMode, generator: torch.Generator,
                             stats: dict | None = None, anchor: KLAnchor | None = None) -> StepReport:
    """x_0 = sample(…, grad=mode); add ∇_θ(−mean r(x_0) [+ β·A]) to the trainable parameters' ``.grad``."""
    rollout = rollout.with_noise_from(generator)
    params = trainable(rollout.network)
    stats = dict(stats or {})
    with CallCounter([rollout.network, *(anchor.networks() if anchor else [])]) as calls:
        x0 = sample(rollout.network, rollout.x_T, grad=mode, **rollout.sample_kwargs())
        r = checked_rewards(reward, x0, need_grad=True)
        loss = -r.mean()
        if anchor is not None:
            penalty = anchor.penalty(rollout, x0, generator)
            stats["kl_anchor"] = float(penalty.detach())
            loss = loss + anchor.weight * penalty
        backward_to_params(loss, params)
    return StepReport(r.detach(), float(loss.detach()), calls.forward, calls.vjp, stats)


class ThroughSamplerMethod(MethodBase):
    """What the methods of this module share: the optional KL anchor (``kl``, ``kl_steps``)."""

    def _set_anchor(self, kl, kl_steps) -> None:
        kl, kl_steps = check_kl(kl, kl_steps, self.name)
        self.anchor = KLAnchor(kl, kl_steps) if kl > 0 else None

    def anchor_options(self) -> dict:
        return {} if self.anchor is None else {"kl": self.anchor.weight, "kl_steps": self.anchor.steps}

    def prepare(self, network, base=None) -> None:
        if self.anchor is not None:
            self.anchor.prepare(network, base)

    def run(self, rollout, reward, mode, generator, stats=None) -> StepReport:
        return backward_through_sampler(rollout, reward, mode, generator, stats, self.anchor)


class ExactMethod(ThroughSamplerMethod):
    """The full-chain gradient (our exact discrete adjoint); ``memory`` as in ``adjointdpm.Exact``."""

    name = "exact"

    def __init__(self, memory=None, kl: float = 0.0, kl_steps: int = DEFAULT_ANCHOR_STEPS):
        try:
            parse_memory(memory)
        except (TypeError, ValueError) as err:
            raise MethodError(f"exact: {err}") from None
        self.memory = memory
        self._set_anchor(kl, kl_steps)

    def options(self):
        return ({} if self.memory is None else {"memory": self.memory}) | self.anchor_options()

    def backward(self, rollout, reward, generator):
        return self.run(rollout, reward, Exact(memory=self.memory), generator)


class TruncatedMethod(ThroughSamplerMethod):
    """DRaFT-K: the gradient through the last ``k`` sampling steps."""

    name = "truncated"

    def __init__(self, k: int = 1, kl: float = 0.0, kl_steps: int = DEFAULT_ANCHOR_STEPS):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise MethodError(f"truncated: k must be an integer ≥ 1 (the steps to back-propagate), got {k!r}")
        self.k = k
        self._set_anchor(kl, kl_steps)

    def options(self):
        return {"k": self.k} | self.anchor_options()

    def backward(self, rollout, reward, generator):
        return self.run(rollout, reward, Truncated(k=self.k), generator, {"k": self.k})


class AlignPropMethod(ThroughSamplerMethod):
    """AlignProp: the gradient through the last K = N − b steps, b = int(Normal(mean·N, std·N)) per iteration."""

    name = "alignprop"

    def __init__(self, mean: float = 0.84, std: float = 0.10, kl: float = 0.0, kl_steps: int = DEFAULT_ANCHOR_STEPS):
        if not 0.0 < float(mean) < 1.0 or float(std) < 0.0:
            raise MethodError(f"alignprop: mean must lie in (0, 1) and std be ≥ 0 (fractions of the steps), "
                              f"got mean={mean!r}, std={std!r}")
        self.mean, self.std = float(mean), float(std)
        self._set_anchor(kl, kl_steps)

    def options(self):
        return {"mean": self.mean, "std": self.std} | self.anchor_options()

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
        return self.run(rollout, reward, Truncated(k=k), generator, {"k": k})


class ContinuousAdjointMethod(ThroughSamplerMethod):
    """AdjointDPM's continuous adjoint (``adjointdpm.Adjoint``): deterministic samplers only."""

    name = "adjoint"

    def __init__(self, state: str = "backsolve", steps: int | None = None, solver: str | None = None,
                 kl: float = 0.0, kl_steps: int = DEFAULT_ANCHOR_STEPS):
        if state not in ADJOINT_STATES:
            raise MethodError(f"adjoint: state must be one of {', '.join(ADJOINT_STATES)}, got {state!r}")
        if solver is not None and solver not in ADJOINT_SOLVERS:
            raise MethodError(f"adjoint: solver must be one of {', '.join(ADJOINT_SOLVERS)}, got {solver!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise MethodError(f"adjoint: steps must be an integer ≥ 1, got {steps!r}")
        self.state, self.steps, self.solver = state, steps, solver
        self._set_anchor(kl, kl_steps)

    def options(self):
        out = {"state": self.state}
        if self.steps is not None:
            out["steps"] = self.steps
        if self.solver is not None:
            out["solver"] = self.solver
        return out | self.anchor_options()

    def check_sampler(self, solver, eta=0.0):
        if is_stochastic(solver_name(solver), float(eta)):
            raise MethodError(f"method 'adjoint' integrates the probability-flow ODE and cannot take the stochastic "
                              f"sampler {solver!r}{' with eta > 0' if solver == 'ddim' else ''}: use a deterministic "
                              "solver (ddim, dpmpp2m, heun) or the method 'exact'")

    def backward(self, rollout, reward, generator):
        self.check_sampler(rollout.solver, rollout.eta)
        mode = Adjoint(state=self.state, steps=self.steps, solver=self.solver)
        return self.run(rollout, reward, mode, generator)
