"""Grey morphology of images in [-1, 1] (bright strokes on a dark background): dilation, erosion, the
morphological gradient (outline) and a crisp 1-pixel outer contour (hollow strokes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ink(x: torch.Tensor) -> torch.Tensor:
    return (x + 1) / 2


def dilate(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Grey dilation of images in [-1, 1] (bright strokes grow)."""
    return F.max_pool2d(x, k, stride=1, padding=k // 2)


def erode(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    return -F.max_pool2d(-x, k, stride=1, padding=k // 2)


def outline(x: torch.Tensor) -> torch.Tensor:
    """Morphological gradient (dilate − erode) of images in [-1, 1]: hollow, outlined strokes."""
    ink = (_ink(dilate(x)) - _ink(erode(x))).clamp(0, 1)
    return ink * 2 - 1


def hollow(x: torch.Tensor) -> torch.Tensor:
    """Crisp outlined strokes: the 1-pixel outer contour of the ink mask (ink > half), white on black,
    the stroke itself left dark (a hollow digit)."""
    mask = (x > 0).to(x.dtype) * 2 - 1
    edge = (dilate(mask) > 0) & (mask < 0)
    return edge.to(x.dtype) * 2 - 1
