"""What an application is: for the command line and reproduce an :class:`Application` (its options, how it
is built, what its report line shows); for the loop a :class:`Task` (named parameter groups, a loss that calls
the engine, an optional projection after each step, an evaluation of a state) and its :class:`Evaluation`.

Parameter groups are *replicated* (weights, a shared embedding: with several processes every one
back-propagates its shard of the batch and the gradients are summed before the step) or *sharded* (one
row per sample, e.g. the noises: each process optimises its own rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..distributed import SingleProcess


@dataclass(frozen=True)
class Application:
    """One application, as the registry (:mod:`.registry`) lists it.

    ``options``: its ``Options`` dataclass (fields made by :func:`~.options.option`: the one source of its
    command-line options, defaults and help); ``build(session, options, seed) -> Task``; ``report_keys``: the
    metrics its command's last line shows (before -> after); ``embedded_guidance``: its recipe's guidance scale
    on the embedded model (None: the model's own); ``help``: the command's help."""

    name: str
    options: type
    build: Callable[..., "Task"]
    report_keys: tuple[str, ...]
    help: str
    embedded_guidance: float | None = None


@dataclass
class ParamGroup:
    """Tensors optimised together (one optimiser parameter group); ``options`` are its optimiser
    settings (lr, weight_decay, …). ``sharded``: one row per sample, split across processes (each
    optimises its own rows); otherwise replicated (gradients summed across processes)."""

    name: str
    tensors: dict[str, torch.Tensor]
    options: dict = field(default_factory=dict)
    sharded: bool = False


@dataclass
class Evaluation:
    """Images (B, C, H, W) in [-1, 1] of one state, and its metrics (JSON-able); ``captions``: one short
    text per image (its metric, e.g. "loss 0.12"), written under it in comparison.png."""

    images: torch.Tensor
    metrics: dict
    nrow: int | None = None
    captions: list[str] | None = None


class Task:
    """An application: what is optimised, the loss, and how a state is evaluated."""

    name = "task"
    loss_name = "loss"  # what the loss curve's axis calls the minimised loss
    dp = SingleProcess()  # the processes the task is spread over (set from the session by multi-process tasks)
    sharded_state: tuple[str, ...] = ()  # names of state_tensors() that hold one row per sample (sharded)
    out: Path | None = None  # the run's output folder (set by the loop before setup; e.g. for live logs)

    def describe(self) -> dict:
        """JSON-able settings that define the run (checked on --resume, written to summary.json)."""
        raise NotImplementedError

    def setup(self) -> None:
        """Build the fixed data of the run (noises, targets, …); called once, before anything else."""

    def param_groups(self) -> list[ParamGroup]:
        raise NotImplementedError

    def make_optimizer(self, groups: list[ParamGroup]) -> torch.optim.Optimizer:
        return torch.optim.AdamW([{"params": list(g.tensors.values()), **g.options} for g in groups])

    def compute_loss(self, iteration: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The scalar loss to back-propagate and a dict of scalars to log."""
        raise NotImplementedError

    def before_step(self, iteration: int) -> None:
        """After backward, before the optimiser step (e.g. zero the gradients of finished samples)."""

    def after_step(self, iteration: int) -> None:
        """After the optimiser step, without grad (e.g. projection onto a constraint set)."""

    def evaluate(self, stage: str) -> Evaluation:
        """Images and metrics of the current state; ``stage`` is "before" or "after"."""
        raise NotImplementedError

    def finished(self) -> bool:
        """True when there is nothing left to optimise (e.g. every attacked sample succeeded)."""
        return False

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Task state other than the parameters that a resumed run needs (e.g. a 'done' mask)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def counted_modules(self) -> list[torch.nn.Module]:
        """Networks whose calls count towards the budget (the denoiser)."""
        return []

    def summarize(self, before: dict, after: dict) -> dict:
        """Extra summary entries derived from the before/after metrics."""
        return {}

    def write_artifacts(self, out: Path) -> dict:
        """Write task outputs (learned weights, embedding, …); return {name: relative path}. Called on
        every process (it may gather); only the main process (``self.dp.is_main``) writes."""
        return {}

    def pipeline_call(self) -> dict | None:
        """The diffusers call that makes the ``after`` images from the files of :meth:`write_artifacts`
        (:func:`.pipeline_call.pipeline_call`), written as ``pipeline_call.json``; None: none."""
        return None
