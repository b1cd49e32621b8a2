"""The application commands: ``guide``, ``audit``, ``stylize``, ``invert`` and ``reproduce``.

Each is a thin typer wrapper: options → a :class:`~.common.Session` + a task + :func:`~.loop.run`.
Every error reaches the user as one line ``adjointdpm: error: …`` with a non-zero exit status
(:func:`~.errors.exit_status`: 2 bad input, 3 non-finite loss/gradient, 130 interrupted, 1 anything else)
and no traceback, unless ``--debug`` is given.

Launched with several processes (``torchrun --nproc_per_node P -m adjointdpm …`` or ``accelerate launch``),
``guide``, ``audit``, ``stylize`` and ``invert`` share the work (see :mod:`adjointdpm.distributed` and the
loop); only the first process writes to ``--out`` and shows the progress bar.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from .common import GRAD_HELP

# ------------------------------------------------------------------------------ shared options
MODEL = typer.Option(None, "--model", "-m", help="Local diffusers folder (SD 1.x/2.x layout) (default: the embedded digits model).")
OUT = typer.Option(..., "--out", "-o", help="Output folder (created): before/, after/, grids, loss_curve.png, summary.json, checkpoint/.")
GRAD = typer.Option("exact", "--grad", help=GRAD_HELP)
MEMORY = typer.Option(None, "--memory-budget", help="With --grad exact: keep the autograd graphs of as many sampling "
                      "steps as fit in this much memory (e.g. 8GiB, inf) instead of recomputing them: as fast as "
                      "back-propagation where memory allows, the same gradient [default: recompute every step].")
SOLVER = typer.Option(None, "--solver", help="Sampler: ddim | dpmpp2m | heun (probability-flow ODE), or stochastic: ddpm | euler_ancestral | dpmpp2m_sde | lcm, and ddim with --eta > 0 (default: the model's).")
ETA = typer.Option(0.0, "--eta", help="DDIM's eta in [0, 1] (--solver ddim only): 0 the deterministic sampler, > 0 injects noise (1: DDPM's posterior), as diffusers' eta=.")
STEPS = typer.Option(None, "--steps", help="Sampling steps (default: the model's).")
GUIDANCE = typer.Option(None, "--guidance-scale", "-g", help="Classifier-free guidance scale (default: the model's; on the embedded model audit, stylize and invert use 1, their recipe).")
SEED = typer.Option(0, "--seed", help="Seed of the noises (and of each iteration's randomness).")
BUDGET = typer.Option(None, "--budget", help="Stop before exceeding this many model calls (network forward + backward evaluations).")
CKPT = typer.Option(5, "--checkpoint-every", help="Save the state every K iterations (also on Ctrl-C and at the end).")
RESUME = typer.Option(False, "--resume", help="Continue the run saved in --out/checkpoint.")
NONFINITE = typer.Option("stop", "--on-nonfinite", help="On a NaN/inf loss or gradient: stop (saving the last good state) or skip the step.")
DEVICE = typer.Option("cpu", "--device", help='torch device, e.g. "cpu" or "cuda".')
CRITICS = typer.Option(None, "--critics", help="The digits model's critics folder (critics/) to use on another model (default: the model's own critics/, if any).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
LOSS = typer.Option(None, "--loss", help="Plug-in objective FILE.py:FUNC or package.module:FUNC: f(images (B,3,H,W) in [-1,1], *, prompts, indices) -> (B,) or scalar, minimised.")
JUDGE = typer.Option(None, "--judge", help="Evaluation-only critic folder (a transformers image classifier or CLIP model), never optimised.")
DEBUG = typer.Option(False, "--debug", help="Show the full traceback on errors.")


def execute(debug: bool, body: Callable[[], int | None]) -> None:
    """Run ``body``; turn any error into one line on stderr and an exit status (traceback with --debug)."""
    from .errors import exit_status

    try:
        code = body() or 0
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug
        if debug:
            raise
        code = exit_status(e)
        msg = str(e) or type(e).__name__
        if code == 1:
            msg = f"{type(e).__name__}: {e} (run with --debug for the traceback)"
        msg = " ".join(msg.split())
        print(f"adjointdpm: error: {msg}", file=sys.stderr)
        raise typer.Exit(code) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print("adjointdpm: error: aborted (no checkpoint written since the last one)", file=sys.stderr)
        raise typer.Exit(130) from None
    if code:
        raise typer.Exit(code)


def _processes(device: str):
    """The processes this command runs in: one (the identity), or all of a torchrun / accelerate launch."""
    from ..distributed import from_environment
    from .common import _device

    return from_environment(_device(device))


def with_memory_budget(grad: str, memory_budget: str | None) -> str:
    """``--grad exact`` with ``--memory-budget B`` is the mode ``exact:memory=B``."""
    if memory_budget is None:
        return grad
    if not str(grad).startswith("exact"):
        from .errors import UserInputError

        raise UserInputError(f"--memory-budget applies to --grad exact (it keeps exact's step graphs), not {grad!r}")
    return f"{grad}{',' if ':' in grad else ':'}memory={memory_budget}"


def _session(model, grad, solver, eta, steps, guidance_scale, device, critics, dp):
    from .common import EngineOptions, Session

    if model is not None and not Path(model).expanduser().exists():
        from .errors import UserInputError

        raise UserInputError(f"model folder {model} does not exist (give a local diffusers folder; nothing is downloaded)")
    if dp.world_size > 1 and dp.device.type == "cuda":
        device = str(dp.device)  # each process its own GPU
    return Session(model, EngineOptions(grad=grad, solver=solver, eta=eta, steps=steps, guidance_scale=guidance_scale,
                                        device=device), critics_path=critics, dp=dp)


def _loop(out, iters, budget, checkpoint_every, resume, on_nonfinite, quiet, seed, dp):
    from .loop import LoopConfig, check_writable

    if dp.is_main:
        check_writable(out)  # before loading anything: an unwritable --out fails at once
    return LoopConfig(out=out, iters=iters, budget=budget, checkpoint_every=checkpoint_every, resume=resume,
                      on_nonfinite=on_nonfinite, progress=not quiet, seed=seed)


def recipe_guidance(command: str, model, guidance_scale):
    """A run's guidance scale: as given; else, on the embedded model, its reproduce preset's (audit, stylize and
    invert were measured at 1, i.e. without classifier-free guidance); else None (the model's default)."""
    if guidance_scale is not None or model is not None:
        return guidance_scale
    from .reproduce import SCALES

    return SCALES["full"].guidance.get(command)


def _run_application(make_task, keys, out, iters, budget, checkpoint_every, resume, on_nonfinite, quiet, seed,
                     model, grad, solver, eta, steps, guidance_scale, device, critics, debug) -> None:
    """The path every application takes: its processes, the loop settings (``--out`` is checked before anything
    loads), the session, ``make_task(session)``, the run; then all processes leave the process group together
    and the first reports. The arguments after ``keys`` are the shared options, in the commands' order."""

    def body():
        from .loop import run

        dp = _processes(device)
        cfg = _loop(out, iters, budget, checkpoint_every, resume, on_nonfinite, quiet, seed, dp)
        s = _session(model, grad, solver, eta, steps, guidance_scale, device, critics, dp)
        summary = run(make_task(s), cfg)
        dp.close()
        if dp.is_main:
            _report(summary, keys, out)

    execute(debug, body)


def _report(summary: dict, keys: list[str], out: Path) -> None:
    parts = []
    for k in keys:
        b, a = summary["before"].get(k), summary["after"].get(k)
        if isinstance(a, float):
            parts.append(f"{k} {b:.3g} -> {a:.3g}" if isinstance(b, float) else f"{k} {a:.3g}")
    typer.echo(f"{summary['task']}: {summary['iterations']} iterations, {summary['model_calls']['total']} model calls, "
               f"{summary['seconds']:.1f} s; " + ", ".join(parts) + f"; wrote {out}")


# ------------------------------------------------------------------------------------- guide
def guide(
    out: Path = OUT,
    target_class: Optional[str] = typer.Option(None, "--target-class", help="Class to reach: with --classifier an index or a label name (config.id2label); on the digits model a digit 0-9 (default: 8)."),
    classifier: Optional[Path] = typer.Option(None, "--classifier", help="Image classifier folder (transformers AutoModelForImageClassification, safetensors): CE to --target-class."),
    clip: Optional[Path] = typer.Option(None, "--clip", help="CLIP folder (transformers CLIPModel + tokenizer): guide toward --clip-prompt."),
    clip_prompt: Optional[str] = typer.Option(None, "--clip-prompt", help="Text the images should match under --clip (default: --prompt)."),
    loss: Optional[str] = LOSS,
    judge: Optional[Path] = JUDGE,
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt (default: on the digits model the target's canonical prompt, e.g. 'a handwritten digit eight'; else '')."),
    n: int = typer.Option(16, "--n", "-n", help="Number of images (noises) optimised together (under torchrun write -n: torchrun reads --n as its own option)."),
    lr: float = typer.Option(0.1, "--lr", help="Step size for the noise (normalised steps; the AdamW learning rate with --optimizer adamw)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay for the noise."),
    renorm: bool = typer.Option(True, "--renorm/--no-renorm", help="Put x_T back on the Gaussian shell after each step (DOODL)."),
    optimize_cond: bool = typer.Option(False, "--optimize-cond", help="Also optimise the prompt embedding (shared by the batch)."),
    optimize_noises: bool = typer.Option(False, "--optimize-noises", help="With a stochastic --solver (ddpm, euler_ancestral, dpmpp2m_sde, lcm, or ddim with --eta > 0): also optimise every step's injected noise (written as noises in latents.safetensors)."),
    cond_lr: float = typer.Option(0.01, "--cond-lr", help="Learning rate for the prompt embedding."),
    start_step: int = typer.Option(0, "--start-step", help="Optimise the sampler's state at this step instead of x_T (0 = x_T)."),
    views: Optional[int] = typer.Option(None, "--views", "--augment", help="Random affine views per image in the loss (cutouts); 0: none (default: 8 for critics, 0 for --loss)."),
    view_noise: float = typer.Option(0.3, "--view-noise", help="Std of Gaussian pixel noise added to each view (0: none)."),
    optimizer: str = typer.Option("normalized", "--optimizer", help="normalized (x -= lr * g / rms(g), per noise) | adamw."),
    stop_loss: Optional[float] = typer.Option(None, "--stop-loss", help="A noise whose loss falls below this is done (0: never) (default: 0.1 for classifiers, 0 otherwise)."),
    iters: int = typer.Option(20, "--iters", help="Optimisation iterations."),
    model: Optional[Path] = MODEL, grad: str = GRAD, memory_budget: Optional[str] = MEMORY, solver: Optional[str] = SOLVER, eta: float = ETA, steps: Optional[int] = STEPS,
    guidance_scale: Optional[float] = GUIDANCE, seed: int = SEED, budget: Optional[int] = BUDGET,
    checkpoint_every: int = CKPT, resume: bool = RESUME, on_nonfinite: str = NONFINITE, device: str = DEVICE,
    critics: Optional[Path] = CRITICS, quiet: bool = QUIET, debug: bool = DEBUG,
) -> None:
    """Guided sampling / vocabulary expansion: optimise x_T toward a class, a text or your loss."""

    def make_task(s):
        from .choose import guide_objective
        from .guide import GuideOptions, GuideTask

        target, judge_obj, text = guide_objective(s, loss=loss, classifier=classifier, clip=clip, clip_prompt=clip_prompt,
                                                  target_class=target_class, judge=judge, prompt=prompt)
        opts = GuideOptions(prompt=text, n=n, lr=lr, weight_decay=weight_decay, renorm=renorm, optimize_cond=optimize_cond,
                            optimize_noises=optimize_noises,
                            cond_lr=cond_lr, start_step=start_step, views=views, view_noise=view_noise,
                            optimizer=optimizer, stop_loss=stop_loss)
        return GuideTask(s, opts, target, judge_obj, seed=seed)

    grad = with_memory_budget(grad, memory_budget)
    _run_application(make_task, ["judge_accuracy", "frechet_to_class", "critic_accuracy", "clip_score", "plugin_loss",
                                 "judge_clip_score"], out, iters, budget, checkpoint_every, resume, on_nonfinite, quiet, seed,
                     model, grad, solver, eta, steps, guidance_scale, device, critics, debug)


# ------------------------------------------------------------------------------------- audit
def audit(
    out: Path = OUT,
    attack: str = typer.Option("classifier", "--attack", help="classifier (flip the classifier's label) | safety (pass the safety filter: the pipeline folder's own safety_checker/)."),
    classifier: Optional[Path] = typer.Option(None, "--classifier", help="Image classifier folder to attack (transformers AutoModelForImageClassification, safetensors)."),
    judge: Optional[Path] = typer.Option(None, "--judge", help="Evaluation-only image classifier folder: an attack succeeds only if it keeps its label."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt of every sample on your own model (default: '')."),
    n: int = typer.Option(100, "--n", "-n", help="Number of samples attacked (under torchrun write -n: torchrun reads --n as its own option)."),
    eps: float = typer.Option(0.2, "--eps", help="l-infinity budget around the original noise."),
    step_size: float = typer.Option(0.05, "--step-size", help="RMS size of one normalised gradient step."),
    margin: float = typer.Option(0.02, "--margin", help="Safety attack: margin below the thresholds."),
    optimize_noises: bool = typer.Option(False, "--optimize-noises", help="With a stochastic --solver (ddpm, euler_ancestral, dpmpp2m_sde, lcm, or ddim with --eta > 0): also attack every step's injected noise, within the same --eps (written as noises in attack.safetensors)."),
    iters: int = typer.Option(6, "--iters", help="Maximum attack iterations."),
    model: Optional[Path] = MODEL, grad: str = GRAD, memory_budget: Optional[str] = MEMORY, solver: Optional[str] = SOLVER, eta: float = ETA, steps: Optional[int] = STEPS,
    guidance_scale: Optional[float] = GUIDANCE, seed: int = SEED, budget: Optional[int] = BUDGET,
    checkpoint_every: int = CKPT, resume: bool = RESUME, on_nonfinite: str = NONFINITE, device: str = DEVICE,
    critics: Optional[Path] = CRITICS, quiet: bool = QUIET, debug: bool = DEBUG,
) -> None:
    """Security auditing: bounded attacks on x_T against a classifier or the safety filter."""

    def make_task(s):
        from .audit import AuditOptions, AuditTask
        from .choose import audit_attack

        target = audit_attack(s, attack=attack, classifier=classifier, margin=margin, judge=judge)
        return AuditTask(s, AuditOptions(n=n, eps=eps, step_size=step_size, margin=margin, prompt=prompt,
                                           optimize_noises=optimize_noises), target, seed=seed)

    grad = with_memory_budget(grad, memory_budget)
    _run_application(make_task, ["success_rate", "judge_keeps_label"], out, iters, budget, checkpoint_every, resume, on_nonfinite, quiet, seed,
                     model, grad, solver, eta, steps, recipe_guidance("audit", model, guidance_scale), device, critics, debug)


# ----------------------------------------------------------------------------------- stylize
def stylize(
    out: Path = OUT,
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Style image: a path to any image file | skimage:NAME (e.g. skimage:brick) | outline (digits model) (default: outline on the digits model)."),
    backbone: Optional[Path] = typer.Option(None, "--backbone", help="Vision backbone folder (any transformers model returning hidden states: CLIP vision, ResNet, ConvNeXt, DINOv2) for the Gram style loss."),
    loss: Optional[str] = LOSS,
    judge: Optional[Path] = JUDGE,
    lora_rank: int = typer.Option(4, "--lora-rank", help="LoRA rank (peft); 0 fine-tunes all the weights."),
    lr: float = typer.Option(3e-3, "--lr", help="AdamW learning rate."),
    content_weight: float = typer.Option(1.0, "--content-weight", help="Weight of the content term."),
    n_train: int = typer.Option(16, "--n-train", help="Training pool of (prompt, noise) pairs."),
    batch: int = typer.Option(8, "--batch", help="Pairs per iteration."),
    n_eval: int = typer.Option(32, "--n-eval", help="Fresh (prompt, noise) pairs for the metrics."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="One prompt for all pairs (default: the digit prompts; '' on other models)."),
    iters: int = typer.Option(10, "--iters", help="Optimisation iterations."),
    model: Optional[Path] = MODEL, grad: str = GRAD, memory_budget: Optional[str] = MEMORY, solver: Optional[str] = SOLVER, eta: float = ETA, steps: Optional[int] = STEPS,
    guidance_scale: Optional[float] = GUIDANCE, seed: int = SEED, budget: Optional[int] = BUDGET,
    checkpoint_every: int = CKPT, resume: bool = RESUME, on_nonfinite: str = NONFINITE, device: str = DEVICE,
    critics: Optional[Path] = CRITICS, quiet: bool = QUIET, debug: bool = DEBUG,
) -> None:
    """Stylization: fine-tune the weights (or LoRA) toward one reference image's style, or your loss."""

    def make_task(s):
        from .choose import stylize_objective
        from .stylize import StylizeOptions, StylizeTask

        objective, judge_obj, prompts, named, ref = stylize_objective(
            s, loss=loss, backbone=backbone, content_weight=content_weight, judge=judge, prompt=prompt, reference=reference)
        opts = StylizeOptions(reference=ref, lora_rank=lora_rank, lr=lr, content_weight=content_weight, n_train=n_train,
                              batch=batch, n_eval=n_eval, prompt=prompt or "")
        return StylizeTask(s, opts, objective, judge_obj, seed=seed, prompts=prompts, references=named)

    grad = with_memory_budget(grad, memory_budget)
    _run_application(make_task, ["style_loss", "judge_accuracy", "plugin_loss"], out, iters, budget, checkpoint_every, resume, on_nonfinite, quiet, seed,
                     model, grad, solver, eta, steps, recipe_guidance("stylize", model, guidance_scale), device, critics, debug)


# ------------------------------------------------------------------------------------ invert
def invert(
    out: Path = OUT,
    effect: str = typer.Option("thicken", "--effect", help="thicken | outline | shift (applied to the model's own images)."),
    targets: Optional[Path] = typer.Option(None, "--targets", help="Folder of target images (PNG/JPEG/…, sorted by name, one per training noise, resized to the model's size) instead of --effect."),
    loss: Optional[str] = LOSS,
    n_train: int = typer.Option(8, "--n-train", help="Training noises."),
    n_heldout: int = typer.Option(8, "--n-heldout", help="Held-out noises (metrics only)."),
    lr: float = typer.Option(0.1, "--lr", help="AdamW learning rate for the embedding."),
    init_prompt: str = typer.Option("", "--init-prompt", help="Prompt whose embedding initialises the search (default: empty)."),
    iters: int = typer.Option(10, "--iters", help="Optimisation iterations."),
    model: Optional[Path] = MODEL, grad: str = GRAD, memory_budget: Optional[str] = MEMORY, solver: Optional[str] = SOLVER, eta: float = ETA, steps: Optional[int] = STEPS,
    guidance_scale: Optional[float] = GUIDANCE, seed: int = SEED, budget: Optional[int] = BUDGET,
    checkpoint_every: int = CKPT, resume: bool = RESUME, on_nonfinite: str = NONFINITE, device: str = DEVICE,
    critics: Optional[Path] = CRITICS, quiet: bool = QUIET, debug: bool = DEBUG,
) -> None:
    """Text-embedding inversion: learn a conditioning embedding that produces a visual effect (or lowers your loss)."""

    def make_task(s):
        from .choose import invert_loss
        from .invert import InvertOptions, InvertTask

        return InvertTask(s, InvertOptions(effect=effect, targets=None if targets is None else str(targets),
                                           n_train=n_train, n_heldout=n_heldout, lr=lr, init_prompt=init_prompt),
                          seed=seed, loss=invert_loss(s, loss=loss))

    grad = with_memory_budget(grad, memory_budget)
    _run_application(make_task, ["psnr_train", "psnr_heldout", "plugin_loss_train", "plugin_loss_heldout"], out, iters, budget, checkpoint_every, resume, on_nonfinite, quiet, seed,
                     model, grad, solver, eta, steps, recipe_guidance("invert", model, guidance_scale), device, critics, debug)


# --------------------------------------------------------------------------------- reproduce
def reproduce(
    out: Path = typer.Option(Path("outputs/reproduce"), "--out", "-o", help="Folder for every run's outputs."),
    docs: Path = typer.Option(Path("docs"), "--docs", help="Where results.md and img/results_*.png are written."),
    scale: str = typer.Option("full", "--scale", help="full (the documented results) | tiny (a smoke test)."),
    only: Optional[str] = typer.Option(None, "--only", help="Comma-separated subset: guide,audit,stylize,invert."),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="Worker processes running applications side by side (default: 2 for full)."),
    threads: int = typer.Option(1, "--threads", help="torch threads per worker."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Another model folder with critics/ (default: the embedded model)."),
    quiet: bool = QUIET, debug: bool = DEBUG,
) -> None:
    """Run all four applications with their baselines on the embedded model; write docs/results.md."""

    def body():
        from .reproduce import reproduce as run_all

        summary = run_all(out, docs, scale=scale, only=None if only is None else [s.strip() for s in only.split(",")],
                          progress=not quiet, model=None if model is None else str(model), jobs=jobs, threads=threads)
        typer.echo(f"reproduce: {summary['seconds']:.0f} s; wrote {docs / 'results.md'} and {out}")

    execute(debug, body)


def register(app: typer.Typer) -> None:
    app.command("guide")(guide)
    app.command("audit")(audit)
    app.command("stylize")(stylize)
    app.command("invert")(invert)
    app.command("reproduce")(reproduce)
