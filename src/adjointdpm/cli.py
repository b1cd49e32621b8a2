"""The ``adjointdpm`` command line (a typer app).

Commands live in their own modules, listed in ``COMMAND_MODULES``; each defines
``register(app: typer.Typer) -> None`` which adds its command(s). To add a command, write such a
module and append its name here. Commands report bad input by raising :class:`CLIError` (or the
loader's ``ComponentsError``, a task's ``UserInputError``, a ``ValueError`` from the engine's input checks
or an ``OSError`` from the file system): ``main`` prints it as one line ``adjointdpm: error: ...`` on
stderr and exits with status 2 (bad input). Pass ``--debug`` (or set ``ADJOINTDPM_DEBUG=1``) to get the
full traceback instead.
"""
from __future__ import annotations

import importlib
import os
import sys

import typer

COMMAND_MODULES = [
    "adjointdpm.commands.sample",
    "adjointdpm.commands.train",
    "adjointdpm.tasks.commands",
    "adjointdpm.commands.demo",
]

app = typer.Typer(
    name="adjointdpm", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Back-propagate a loss on diffusion samples to the initial noise, text embeddings and weights.",
)
_registered = False


class CLIError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def register_commands() -> typer.Typer:
    global _registered
    if not _registered:
        for name in COMMAND_MODULES:
            importlib.import_module(name).register(app)
        _registered = True
    return app


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
    from .components import ComponentsError
    from .tasks.errors import TaskError

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
    except (CLIError, ComponentsError, TaskError, ValueError, OSError) as e:
        if debug:
            raise
        return _fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__,
                     e.exit_code if isinstance(e, TaskError) else 2)


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
