"""The application commands — one per entry of :data:`adjointdpm.apps.registry.APPLICATIONS` (``guide``,
``audit``, ``stylize``, ``invert``) — and ``reproduce``.

Each application command takes ``--out``, the application's own options (its ``Options`` dataclass) and the
shared groups (:mod:`adjointdpm.apps.options`), all generated from the dataclasses' fields; its body is
:func:`~adjointdpm.apps.launch.run_application`. Errors reach the user through :func:`adjointdpm.cli.run`.

Launched with several processes (``torchrun --nproc_per_node P -m adjointdpm …`` or ``accelerate launch``), the
application commands share the work (see :mod:`adjointdpm.distributed` and the loop); only the first process
writes to ``--out`` and shows the progress bar.
"""

from __future__ import annotations

import typer

from ..apps.options import ConsoleOptions, EngineOptions, LoopOptions, OutputOptions, typer_command
from ..apps.task import Application


def application_command(app: Application):
    """The typer command of ``app``: options → :func:`~adjointdpm.apps.launch.run_application` → one line."""

    def body(output: OutputOptions, options, engine: EngineOptions, loop: LoopOptions, console: ConsoleOptions):
        from ..apps.launch import report_line, run_application

        summary = run_application(app, options, engine, loop, output.out, progress=not console.quiet)
        if summary is not None:
            typer.echo(report_line(app, summary, output.out))

    return typer_command({"output": OutputOptions, "options": app.options, "engine": EngineOptions,
                          "loop": LoopOptions, "console": ConsoleOptions}, body, app.help)


def reproduce_command():
    from ..apps.reproduce import ReproduceOptions

    def body(options: ReproduceOptions, console: ConsoleOptions):
        from ..apps.reproduce import reproduce

        only = None if options.only is None else [s.strip() for s in options.only.split(",")]
        summary = reproduce(options.out, options.docs, scale=options.scale, only=only, progress=not console.quiet,
                            model=None if options.model is None else str(options.model), jobs=options.jobs,
                            threads=options.threads)
        typer.echo(f"reproduce: {summary['seconds']:.0f} s; wrote {options.docs / 'results.md'} and {options.out}")

    return typer_command({"options": ReproduceOptions, "console": ConsoleOptions}, body,
                         "Run all four applications with their baselines on the embedded model; write docs/results.md.")


def register(app: typer.Typer) -> None:
    from ..apps.registry import APPLICATIONS

    for name, application in APPLICATIONS.items():
        app.command(name)(application_command(application))
    app.command("reproduce")(reproduce_command())
