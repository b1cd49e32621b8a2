"""Critics from local folders, and plug-in losses: what the applications optimise on a user's own model.

* :mod:`.plugin`     ``--loss FILE.py:FUNC`` / ``package.module:FUNC``, its contract checked at the first call
* :mod:`.classifier` any transformers ``AutoModelForImageClassification`` folder
* :mod:`.clip`       a transformers ``CLIPModel`` folder (image and text embeddings)
* :mod:`.safety`     a pipeline folder's own ``safety_checker/`` (diffusers' StableDiffusionSafetyChecker)
* :mod:`.backbone`   any transformers vision backbone returning hidden states, and a Gram-matrix style loss
* :mod:`.preprocess` a folder's image processor re-done differentiably in torch
* :mod:`.folders`    offline, safetensors-only opening of a folder; :mod:`.errors` the one error type
* :mod:`.objectives` what the applications optimise and evaluate, as protocols (target, judge, attack, style,
  loss); :mod:`.folder_objectives` their implementations over the critics above and plug-in losses

All take images (B, C, H, W) in [-1, 1] and are differentiable w.r.t. them; their weights are frozen.
Imports point one way: critics use transformers / diffusers only (never the engine, the tasks or the
embedded digits model).
"""

from __future__ import annotations

from .errors import CriticError
from .folders import check_folder, read_config


def folder_kind(path, what: str) -> str:
    """"clip" or "classifier": what a critic folder holds, from its config.json."""
    folder = check_folder(path, what)
    cfg = read_config(folder)
    archs = " ".join(cfg.get("architectures") or [])
    if cfg.get("model_type") == "clip" or "CLIPModel" in archs:
        return "clip"
    if "ForImageClassification" in archs or cfg.get("id2label"):
        return "classifier"
    raise CriticError(f"{what} {folder}: neither an image classifier nor a CLIP model (config.json "
                      f"architectures: {archs or 'none'})")


__all__ = ["CriticError", "folder_kind"]
