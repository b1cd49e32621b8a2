"""The one error the critics raise: bad user input about a critic (a folder, a loss file, a label)."""

from __future__ import annotations


class CriticError(ValueError):
    """A critic cannot be loaded or used as given; ``str(err)`` is one line naming the fix."""
