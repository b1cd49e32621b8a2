"""``brighten``: a complete application in one module — the example of docs/applications.md.

Optimise the initial noises x_T so that the images reach a mean brightness b:

    min_x  E_b (mean(decode(sample(x_b, c))) − b)²

It has what every application has: ``Options`` (its command-line options: default, flags and help in each
field), a :class:`~adjointdpm.apps.task.Task`, ``build(session, options, seed)`` and an ``APPLICATION``
record. Listed in ``adjointdpm/apps/registry.py`` it becomes ``adjointdpm brighten --brightness 0.3 --out DIR``
with the shared options (``--model``, ``--grad``, ``--steps``, ``--resume``, …), a progress bar, checkpoints,
``before/``, ``after/`` and ``summary.json``. (One process; see guide.py for sharding the noises.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adjointdpm.apps.errors import UserInputError
from adjointdpm.apps.options import option, settings_of
from adjointdpm.apps.session import Session
from adjointdpm.apps.task import Application, Evaluation, ParamGroup, Task


@dataclass
class Options:
    brightness: float = option(0.5, "--brightness", help="Mean pixel value to reach, in [-1, 1].")
    n: int = option(4, "--n", "-n", help="Number of images (noises) optimised together.")
    lr: float = option(0.05, "--lr", help="AdamW learning rate for the noises.")
    prompt: str = option("", "--prompt", "-p", help="Prompt of every image.")
    iters: int = option(10, "--iters", help="Optimisation iterations.")


class BrightenTask(Task):
    name = "brighten"

    def __init__(self, session: Session, opts: Options, seed: int = 0):
        if not -1 <= opts.brightness <= 1 or opts.n < 1:
            raise UserInputError(f"--brightness must be in [-1, 1] and --n >= 1, got {opts.brightness}, {opts.n}")
        session.check_prompt(opts.prompt)
        self.session, self.opts, self.seed = session, opts, seed

    def describe(self) -> dict:  # summary.json's settings; --resume checks them
        return {**self.session.describe(), **settings_of(self.opts, ("brightness", "n", "lr", "prompt"))}

    def setup(self) -> None:
        self.cond = self.session.encode([self.opts.prompt])
        self.x = self.session.noise(self.opts.n, self.seed).requires_grad_(True)

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("x_T", {"x": self.x}, {"lr": self.opts.lr})]

    def counted_modules(self):
        return [self.session.network]

    def objective(self, x0: torch.Tensor) -> torch.Tensor:
        images = self.session.decode(x0).float()
        return (images.mean((1, 2, 3)) - self.opts.brightness).pow(2)

    def compute_loss(self, iteration, generator):
        loss, per_sample, x0 = self.session.sampled_loss(self.x, self.cond, self.objective)
        return loss, {}

    def evaluate(self, stage: str) -> Evaluation:
        images = self.session.generate(self.x.detach(), self.cond)
        return Evaluation(images, {"brightness": float(images.mean()),
                                   "distance": float((images.mean((1, 2, 3)) - self.opts.brightness).abs().mean())})


def build(session: Session, options: Options, seed: int = 0) -> BrightenTask:
    return BrightenTask(session, options, seed=seed)


APPLICATION = Application(name="brighten", options=Options, build=build, report_keys=("brightness", "distance"),
                          help="Optimise the initial noises toward a mean brightness (an example application).")
