"""The ``adjointdpm`` command line (a typer app).

Commands live in their own modules, listed in ``COMMAND_MODULES``; each defines
``register(app: typer.Typer) -> None`` which adds its command(s) (the application commands come from the
registry of :mod:`adjointdpm.apps.registry`). To add a command, write such a module and append its name here.

:func:`run` is the one path from an error to an exit status, for every command: commands report bad input by
raising :class:`~adjointdpm.apps.errors.UserInputError` (or the loader's ``ComponentsError``, a critic's
``CriticError``, a ``ValueError`` from the engine's input checks or an ``OSError`` from the file system);
:func:`~adjointdpm.apps.errors.exit_status` gives the status (2 bad input, 3 non-finite loss or gradient, 130
interrupted, 1 anything else) and the error is printed as one line ``adjointdpm: error: ...`` on stderr. Pass
``--debug`` (or set ``ADJOINTDPM_DEBUG=1``) to get the full traceback instead.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys

import typer

COMMAND_MODULES = [
    "adjointdpm.commands.sample",
    "adjointdpm.commands.train",
    "adjointdpm.commands.applications",
    "adjointdpm.commands.demo",
]

app = typer.Typer(
    name="adjointdpm", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Back-propagate a loss on diffusion samples to the initial noise, text embeddings and weights.",
)
_registered = False


def register_commands() -> typer.Typer:
    global _registered
    if not _registered:
        for name in COMMAND_MODULES:
            importlib.import_module(name).register(app)
        for info in app.registered_commands:
            info.callback = _reporting_interrupts(info.callback)
        _registered = True
    return app


def _reporting_interrupts(callback):
    """``callback`` with a Ctrl-C that reaches it (a second one, during a run) raised as an error :func:`run`
    reports (typer would turn it into a silent exit)."""

    @functools.wraps(callback)
    def command(*args, **kwargs):
        from .apps.errors import Interrupted

        try:
            return callback(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted("aborted (no checkpoint written since the last one)") from None

    return command


def _fail(message: str, code: int) -> int:
    msg = " ".join(str(message).split()) or "unknown error"
    print(f"adjointdpm: error: {msg}", file=sys.stderr)
    return code


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(ClickException, NoArgsIsHelpError, Abort) classes of click and of typer's vendored copy."""
    mods = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass

    def pick(attr):
        return tuple(getattr(m, attr) for m in mods if hasattr(m, attr))

    return pick("ClickException"), pick("NoArgsIsHelpError"), pick("Abort")


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: sys.argv[1:]) and return the exit status."""
    from .apps.errors import exit_status

    register_commands()
    click_error, no_args, abort = _click_exceptions()
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    debug = os.environ.get("ADJOINTDPM_DEBUG") == "1" or "--debug" in args
    try:
        rv = app(args=argv, prog_name="adjointdpm", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except no_args as e:
        print(e.ctx.get_help() if getattr(e, "ctx", None) else str(e))
        return 0
    except click_error as e:
        if debug:
            raise
        return _fail(e.format_message(), e.exit_code)
    except abort:
        return _fail("aborted", 130)
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug
        if debug:
            raise
        code = exit_status(e)
        message = str(e).strip() or type(e).__name__
        if code == 1:
            message = f"{type(e).__name__}: {message} (run with --debug for the traceback)"
        return _fail(message, code)


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
