"""Errors of the application commands: each carries the one line the CLI prints and an exit code."""

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
