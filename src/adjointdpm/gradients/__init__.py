"""Gradient modes of ``adjointdpm.sample`` (see each module for the maths)."""

from .adjoint import Adjoint
from .autograd_modes import Backprop, Checkpoint, Truncated
from .base import GradMode
from .exact import Exact
from .reversible import Reversible

GRAD_MODES: dict[str, type[GradMode]] = {m.name: m for m in (Adjoint, Exact, Backprop, Checkpoint, Truncated, Reversible)}


def resolve_grad_mode(grad) -> GradMode | None:
    """A mode object from a mode object, its name, a spec ``"name:key=value,…"`` (e.g. ``"adjoint:steps=5"``,
    ``"truncated:k=2"``; ``"adjoint-stored"`` is ``"adjoint:state=stored"``), or None / "none" (plain
    sampling, no graph)."""
    if grad is None or grad == "none":
        return None
    if isinstance(grad, GradMode):
        return grad
    if isinstance(grad, str):
        name, _, rest = grad.strip().partition(":")
        kwargs: dict = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, val = item.partition("=")
            if not eq:
                raise ValueError("options are key=value pairs, e.g. adjoint:steps=5")
            kwargs[key.strip()] = int(val) if val.strip().lstrip("-").isdigit() else val.strip()
        if name == "adjoint-stored":
            name = "adjoint"
            kwargs.setdefault("state", "stored")
        if name in GRAD_MODES:
            try:
                return GRAD_MODES[name](**kwargs)
            except TypeError as e:
                raise ValueError(str(e)) from None
    raise ValueError(
        f"unknown grad mode {grad!r}; use one of {', '.join(GRAD_MODES)}, None, "
        "or an instance such as adjointdpm.Adjoint(state='stored') or adjointdpm.Truncated(k=2)"
    )


__all__ = ["Adjoint", "Backprop", "Checkpoint", "Exact", "GradMode", "Truncated", "GRAD_MODES", "resolve_grad_mode"]
