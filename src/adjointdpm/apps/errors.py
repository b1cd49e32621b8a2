"""Errors of every ``adjointdpm`` command: each carries the one line the CLI prints and an exit code
(:class:`UserInputError` is the one bad-input error); and :func:`exit_status`, the one place where any error
becomes an exit status (used by :func:`adjointdpm.cli.run`)."""

from __future__ import annotations


class TaskError(Exception):
    """An application run cannot go on; ``str(err)`` is the one line shown to the user."""

    exit_code = 1


class UserInputError(TaskError):
    """Bad input from the user (missing folder, wrong image, prompt too long, unwritable --out, …)."""

    exit_code = 2


class NonFiniteError(TaskError):
    """A non-finite loss or gradient appeared; the last good state was saved."""

    exit_code = 3


class Interrupted(TaskError):
    """SIGINT: the state was saved; ``--resume`` continues."""

    exit_code = 130


def exit_status(error: BaseException) -> int:
    """The one mapping from errors to the commands' exit status: a :class:`TaskError` carries its own; bad
    input found elsewhere — a model folder (``ComponentsError``), a critic or a plug-in loss (``CriticError``,
    a ``ValueError``), the engine's input checks (``ValueError``) or the file system
    (``OSError``) — is 2; anything else is a bug: 1."""
    from ..components import ComponentsError

    if isinstance(error, TaskError):
        return error.exit_code
    if isinstance(error, (ComponentsError, ValueError, OSError)):
        return 2
    return 1
