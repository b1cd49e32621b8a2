"""Command-line options written once: dataclass fields that carry their own flags and help.

An option is a dataclass field made by :func:`option` — its default, its flags and its help text in one
place. An application's ``Options`` and the shared groups below are such dataclasses; :func:`typer_command`
turns a list of them into one typer command (each field one ``--flag``) whose body receives one instance of
each group. So the defaults a library user gets from ``guide.Options()`` are the command line's, and no
option is declared twice.

Shared groups (every application command takes them): :class:`OutputOptions` (``--out``),
:class:`EngineOptions` (model and sampler: ``--model``, ``--config``, ``--dtype``, ``--offload``, ``--compile``,
``--grad``, ``--memory-budget``, ``--solver``, ``--eta``, ``--steps``, ``--guidance-scale``, ``--height``,
``--width``, ``--max-sequence-length``, ``--negative-prompt``, ``--device``, ``--critics``), :class:`LoopOptions`
(``--seed``, ``--budget``, ``--checkpoint-every``, ``--resume``, ``--overwrite``, ``--on-nonfinite``) and
:class:`ConsoleOptions`
(``--quiet``, ``--debug``); the critic options two applications share are :func:`loss_option` and
:func:`judge_option`.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..gradients import GRAD_MODES

GRAD_CHOICES = (*GRAD_MODES, "adjoint-stored", "onestep")
GRAD_HELP = (f"gradient mode: {' | '.join(GRAD_CHOICES)} (onestep: the one-step x̂₀ baseline); "
             "options after a colon, e.g. adjoint:steps=5, truncated:k=2")


def option(default: Any, *flags: str, help: str, **typer_settings) -> Any:
    """A dataclass field that is also a command-line option: ``flags`` (e.g. ``"--n", "-n"``), ``help``, and
    any further ``typer.Option`` settings (e.g. ``min=1``). ``default=...`` makes the option required."""
    return field(default=default, metadata={"flags": flags, "help": help, "typer": typer_settings})


def is_option(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("flags"))


def typer_parameters(groups: list[type]) -> list[inspect.Parameter]:
    """The option fields of ``groups`` (dataclasses) as typer parameters, in order."""
    import typer

    params = []
    for cls in groups:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not is_option(f):
                continue
            meta = f.metadata
            default = typer.Option(f.default, *meta["flags"], help=meta["help"], **meta["typer"])
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=hints[f.name]))
    return params


def typer_option(cls: type, name: str):
    """The ``typer.Option`` of one field of ``cls``, for a command written by hand that shares it."""
    (param,) = [p for p in typer_parameters([cls]) if p.name == name]
    return param.default


def typer_command(groups: dict[str, type], body: Callable[..., Any], doc: str) -> Callable[..., Any]:
    """A typer command taking the options of ``groups`` ({argument name: dataclass}); it calls
    ``body(**{argument name: dataclass instance})``."""
    params = typer_parameters(list(groups.values()))
    owner = {p.name: key for key, cls in groups.items() for p in typer_parameters([cls])}
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise TypeError(f"an option is declared twice: {sorted(n for n in names if names.count(n) > 1)}")

    def command(**values):
        parts = {key: {} for key in groups}
        for name, value in values.items():
            parts[owner[name]][name] = value
        return body(**{key: cls(**parts[key]) for key, cls in groups.items()})

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    return command


# ------------------------------------------------------------------------------- shared groups
@dataclass
class OutputOptions:
    out: Path = option(..., "--out", "-o", help="Output folder (created): before/, after/, grids, loss_curve.png, "
                                                "summary.json, checkpoint/.")


@dataclass
class EngineOptions:
    """The model and how to sample from it (what a :class:`~.session.Session` is made from)."""

    model: Optional[Path] = option(
        None, "--model", "-m", help="The model: a diffusers folder of any supported family (SD 1.x/2.x, SDXL, SD3/3.5, "
        "Flux, PixArt), a Hugging Face id org/name[@revision] (from the Hugging Face cache; downloaded when online, "
        "never with HF_HUB_OFFLINE=1), or a single-file .safetensors checkpoint of the network with --config "
        "(default: the embedded digits model).")
    config: Optional[Path] = option(
        None, "--config", help="With a single-file --model: the diffusers folder or Hugging Face id whose configs and "
        "other components (text encoders, VAE, scheduler) go with it.")
    dtype: str = option("auto", "--dtype", help="Weights' precision: bf16 | fp16 | fp32 | auto (bf16 on CUDA, fp32 "
                        "on CPU). Samples, noise and gradients are in it; exact's weight gradients accumulate in "
                        "float32.")
    offload: bool = option(False, "--offload", help="Keep the frozen parts (text encoders, VAE) in CPU memory; each "
                           "layer comes to the device only while it runs (less device memory, slower).")
    compile: bool = option(False, "--compile", help="torch.compile the network (slow first call; faster steps after "
                           "on a GPU).")
    grad: str = option("exact", "--grad", help=GRAD_HELP)
    memory_budget: Optional[str] = option(
        None, "--memory-budget", help="With --grad exact: keep the autograd graphs of as many sampling steps as fit "
        "in this much memory (e.g. 8GiB, inf) instead of recomputing them: as fast as back-propagation where memory "
        "allows, the same gradient [default: recompute every step].")
    solver: Optional[str] = option(None, "--solver", help="Sampler: ddim | dpmpp2m | heun | pndm | unipc (probability-flow ODE), or "
                                   "stochastic: ddpm | euler_ancestral | dpmpp2m_sde | lcm, and ddim with --eta > 0 "
                                   "(default: the model's).")
    eta: float = option(0.0, "--eta", help="DDIM's eta in [0, 1] (--solver ddim only): 0 the deterministic sampler, "
                                           "> 0 injects noise (1: DDPM's posterior), as diffusers' eta=.")
    steps: Optional[int] = option(None, "--steps", help="Sampling steps (default: the model's).")
    guidance_scale: Optional[float] = option(
        None, "--guidance-scale", "-g", help="Classifier-free guidance scale (default: the model's; on the embedded "
        "model audit, stylize and invert use 1, their recipe).")
    device: str = option("cpu", "--device", help='torch device, e.g. "cpu" or "cuda".')
    height: Optional[int] = option(None, "--height", help="Image height in pixels (default: the model's).")
    width: Optional[int] = option(None, "--width", help="Image width in pixels (default: the model's).")
    max_sequence_length: Optional[int] = option(
        None, "--max-sequence-length", help="T5 prompt length in tokens on SD3, Flux and PixArt (default: the "
        "model's: 256, 512, 300).")
    negative_prompt: Optional[str] = option(None, "--negative-prompt", help="The prompt classifier-free guidance "
                                            "steers away from (default: the empty prompt, as the pipeline).")
    critics: Optional[Path] = option(None, "--critics", help="The digits model's critics folder (critics/) to use on "
                                     "another model (default: the model's own critics/, if any).")

    def load_kwargs(self) -> dict:
        """What :func:`~adjointdpm.components.load_components` takes from these options (besides the model)."""
        return {"dtype": self.dtype, "config": self.config, "offload": self.offload, "compile": self.compile}

    def grad_spec(self) -> str:
        """``--grad`` with ``--memory-budget B`` folded in: ``exact`` becomes the mode ``exact:memory=B``."""
        if self.memory_budget is None:
            return self.grad
        if not str(self.grad).startswith("exact"):
            from .errors import UserInputError

            raise UserInputError(f"--memory-budget applies to --grad exact (it keeps exact's step graphs), not "
                                 f"{self.grad!r}")
        return f"{self.grad}{',' if ':' in self.grad else ':'}memory={self.memory_budget}"


@dataclass
class LoopOptions:
    """How the optimisation loop runs (the rest of :class:`~.loop.LoopConfig`: ``--out``, ``--iters``)."""

    seed: int = option(0, "--seed", help="Seed of the noises (and of each iteration's randomness).")
    budget: Optional[int] = option(None, "--budget", help="Stop before exceeding this many model calls (network "
                                                          "forward + backward evaluations).")
    checkpoint_every: int = option(5, "--checkpoint-every", help="Save the state every K iterations (also on Ctrl-C "
                                                                 "and at the end).")
    resume: bool = option(False, "--resume", help="Continue the run saved in --out/checkpoint.")
    overwrite: bool = option(False, "--overwrite", help="Replace the earlier run in --out (its outputs are removed "
                             "when the run starts); without it, or --resume, an earlier run there is refused.")
    on_nonfinite: str = option("stop", "--on-nonfinite", help="On a NaN/inf loss or gradient: stop (saving the last "
                                                              "good state) or skip the step.")


@dataclass
class ConsoleOptions:
    """What the terminal shows (``--debug`` is acted on by :func:`adjointdpm.cli.run`, around every command)."""

    quiet: bool = option(False, "--quiet", "-q", help="No progress bar.")
    debug: bool = option(False, "--debug", help="Show the full traceback on errors.")


# ----------------------------------------------------------------------- shared critic options
def loss_option() -> Any:
    return option(None, "--loss", help="Plug-in objective FILE.py:FUNC or package.module:FUNC: f(images (B,3,H,W) in "
                                       "[-1,1], *, prompts, indices) -> (B,) or scalar, minimised.")


def judge_option() -> Any:
    return option(None, "--judge", help="Evaluation-only critic folder (a transformers image classifier or CLIP "
                                        "model), never optimised.")


def settings_of(options, names: tuple[str, ...], **resolved) -> dict:
    """The task settings ``names`` of ``options`` (what summary.json's settings and ``--resume`` compare), with
    ``resolved`` values (e.g. the prompt an objective chose) in place of the options' own; paths as text."""
    out = {}
    for name in names:
        value = resolved[name] if name in resolved else getattr(options, name)
        out[name] = str(value) if isinstance(value, Path) else value
    return out
