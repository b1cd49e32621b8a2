"""The diffusers pipeline families ``load_components`` opens, one module each, keyed by pipeline class.

Each module's docstring states how its pipeline conditions the network; ``family_of(class_name)``
picks the family of a folder from ``model_index.json``'s ``_class_name`` (None or absent: SD 1.x/2.x).
"""
from __future__ import annotations

from .base import Family, Part, SamplingSetup
from .flux import Flux
from .pixart import PixArt
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

FAMILIES: tuple[Family, ...] = (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux(), PixArt())
BY_PIPELINE = {p: f for f in FAMILIES for p in f.pipelines}
BY_NAME = {f.name: f for f in FAMILIES}


def family_of(class_name: str | None) -> Family | None:
    """The family of a pipeline class name (None: not one we open)."""
    if class_name is None:
        return BY_NAME["sd"]
    return BY_PIPELINE.get(class_name)


__all__ = ["BY_NAME", "BY_PIPELINE", "FAMILIES", "Family", "Part", "SamplingSetup", "family_of"]
