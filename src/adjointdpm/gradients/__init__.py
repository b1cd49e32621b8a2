"""Gradient modes of ``adjointdpm.sample`` (see each module for the maths)."""

from .adjoint import Adjoint
from .autograd_modes import Backprop, Checkpoint, Truncated
from .base import GradMode
from .exact import Exact
from .reversible import Reversible

GRAD_MODES: dict[str, type[GradMode]] = {m.name: m for m in (Adjoint, Exact, Backprop, Checkpoint, Truncated, Reversible)}


def resolve_grad_mode(grad) -> GradMode | None:
    """A mode object from a mode object, its name, or None / "none" (plain sampling, no graph)."""
    if grad is None or grad == "none":
        return None
    if isinstance(grad, GradMode):
        return grad
    if isinstance(grad, str) and grad in GRAD_MODES:
        return GRAD_MODES[grad]()
    raise ValueError(
        f"unknown grad mode {grad!r}; use one of {', '.join(GRAD_MODES)}, None, "
        "or an instance such as adjointdpm.Adjoint(state='stored') or adjointdpm.Truncated(k=2)"
    )


__all__ = ["Adjoint", "Backprop", "Checkpoint", "Exact", "GradMode", "Truncated", "GRAD_MODES", "resolve_grad_mode"]
