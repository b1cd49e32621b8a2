"""One application run from its options, the path every application command takes: the processes it runs in
(one, or all of a ``torchrun`` / ``accelerate launch``), ``--out`` checked (not created) before anything loads,
the session, the application's ``build``, the loop; then all processes leave the process group together and the first one
reports."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .checks import parse_device
from .loop import LoopConfig, run
from .outputs import check_out
from .options import EngineOptions, LoopOptions
from .session import Session
from .task import Application


def recipe_engine(app: Application, engine: EngineOptions) -> EngineOptions:
    """The engine options a run gets: as given; on the embedded model without ``--guidance-scale``, the
    application's recipe guidance scale (audit, stylize and invert were measured at 1, i.e. without
    classifier-free guidance)."""
    if engine.guidance_scale is not None or engine.model is not None or app.embedded_guidance is None:
        return engine
    return replace(engine, guidance_scale=app.embedded_guidance)


def run_application(app: Application, options, engine: EngineOptions, loop: LoopOptions, out: Path,
                     progress: bool = True) -> dict | None:
    """Run ``app`` with ``options``; return its summary on the first process (None on the others)."""
    from ..distributed import from_environment

    engine.grad_spec()  # --memory-budget with a mode other than exact fails before anything else
    dp = from_environment(parse_device(engine.device))
    config = LoopConfig(out=out, iters=options.iters, budget=loop.budget, checkpoint_every=loop.checkpoint_every,
                        resume=loop.resume, overwrite=loop.overwrite, on_nonfinite=loop.on_nonfinite,
                        progress=progress, seed=loop.seed)
    if dp.is_main:
        check_out(out, loop.resume, loop.overwrite)  # before loading anything; nothing is created before the run
    session = Session(recipe_engine(app, engine), dp=dp)
    summary = run(app.build(session, options, seed=loop.seed), config)
    dp.close()
    return summary if dp.is_main else None


def report_line(app: Application, summary: dict, out: Path) -> str:
    """The command's last line: iterations, model calls, time and the ``app.report_keys`` before -> after."""
    parts = []
    for k in app.report_keys:
        b, a = summary["before"].get(k), summary["after"].get(k)
        if isinstance(a, float):
            parts.append(f"{k} {b:.3g} -> {a:.3g}" if isinstance(b, float) else f"{k} {a:.3g}")
    return (f"{summary['task']}: {summary['iterations']} iterations, {summary['model_calls']['total']} model calls, "
            f"{summary['seconds']:.1f} s; " + ", ".join(parts) + f"; wrote {out}")
