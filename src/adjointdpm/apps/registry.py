"""The applications, by name: the command line (one command each), ``reproduce`` and the docs all read this
table. Adding an application = writing its module (``Options``, a :class:`~.task.Task`, ``build`` and an
``APPLICATION`` record; see docs/applications.md, "Adding an application") and adding one line here."""

from __future__ import annotations

from . import audit, finetune, guide, invert, stylize
from .task import Application

APPLICATIONS: dict[str, Application] = {a.name: a for a in (
    guide.APPLICATION,
    audit.APPLICATION,
    stylize.APPLICATION,
    invert.APPLICATION,
    finetune.APPLICATION,
)}

