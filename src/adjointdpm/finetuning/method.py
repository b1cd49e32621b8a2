"""The one interface every fine-tuning method implements.

A method turns one :class:`~adjointdpm.finetuning.rollout.Rollout` (a batch to sample) and a reward to
maximise into gradients: ``backward`` ADDS the gradient of the method's loss to ``p.grad`` of every
trainable parameter of the network (those with ``requires_grad``: full weights or LoRA adapters), like
``loss.backward()`` (the caller zeroes ``.grad`` and steps the optimiser), and returns a
:class:`StepReport` (rewards, loss, measured model calls, the method's own numbers).

The methods differ only in where the gradient of E[r(x_0)] comes from (see each module):
``exact`` (the whole sampler), ``truncated`` (DRaFT-K), ``alignprop`` (a random number of final steps),
``onestep`` (ReFL), ``adjoint`` (AdjointDPM's continuous adjoint), ``adjoint-matching``.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from ..gradients.sharded import backward_to
from ..model import trainable_parameters
from .errors import MethodError
from .rollout import Reward, Rollout, StepReport


@runtime_checkable
class Method(Protocol):
    name: str

    @property
    def spec(self) -> str:
        """The method as ``parse_method`` reads it back (name and every option)."""

    def check_sampler(self, solver: str, eta: float = 0.0) -> None:
        """Raise MethodError if the method cannot take this sampler (before anything runs)."""

    def prepare(self, network: Callable, base: Callable | None = None) -> None:
        """Called once with the network before its first update (Adjoint Matching records the base model)."""

    def backward(self, rollout: Rollout, reward: Reward, generator: torch.Generator) -> StepReport:
        """Add ∇_θ of the method's loss to ``p.grad``; ``generator`` draws the method's random choices."""

    def state_dict(self) -> dict:
        """What a resumed run needs to continue identically (running statistics)."""

    def load_state_dict(self, state: dict) -> None: ...


class MethodBase:
    """Defaults shared by the methods: any sampler, nothing to prepare, no state."""

    name = "method"

    @property
    def spec(self) -> str:
        options = self.options()
        if not options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in options.items())

    def options(self) -> dict:
        return {}

    def check_sampler(self, solver: str, eta: float = 0.0) -> None:
        return None

    def prepare(self, network, base=None) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"


def trainable(network: Callable) -> list[torch.Tensor]:
    """The network's parameters with requires_grad; none is a MethodError (nothing to fine-tune)."""
    params = trainable_parameters(network)
    if not params:
        raise MethodError("the network has no parameter with requires_grad: add LoRA adapters "
                          "or call requires_grad_(True) on the weights to fine-tune")
    return params


def backward_to_params(loss: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Add ∇_θ loss to ``p.grad`` of ``params`` only (a reward model's weights are never touched); under FSDP2
    (sharded DTensor parameters) the pass reaches the gathered weights instead, see ``gradients.sharded``."""
    backward_to(loss, None, params)


def seed_from(generator: torch.Generator) -> int:
    """A 63-bit seed drawn from the method's generator (for the noises of a sampler it runs itself)."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator).item())
