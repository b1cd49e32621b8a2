"""Random affine views of images (small rotations, scalings, shifts): the paper's "cutouts".

A critic scored on several random views of an image is harder to fool with a perturbation that works
on one exact pixel grid only. Images (B, C, S, S) in [-1, 1]; the view is resampled bilinearly, the area
moved in from outside is black (−1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(x: torch.Tensor, generator: torch.Generator, max_rot_deg: float = 10.0,
            scale: tuple[float, float] = (0.9, 1.1), max_shift_px: float = 1.0, p: float = 1.0) -> torch.Tensor:
    """Random affine jitter of images in [-1, 1] (B, C, S, S); each image transformed with probability p."""
    b, _, s, _ = x.shape
    u = torch.rand(b, 4, generator=generator)
    ang = (u[:, 0] * 2 - 1) * math.radians(max_rot_deg)
    sc = scale[0] + u[:, 1] * (scale[1] - scale[0])
    shift = (u[:, 2:] * 2 - 1) * max_shift_px * 2.0 / s  # normalised coordinates
    keep = torch.rand(b, generator=generator) >= p
    ang = torch.where(keep, torch.zeros_like(ang), ang)
    sc = torch.where(keep, torch.ones_like(sc), sc)
    shift = torch.where(keep[:, None], torch.zeros_like(shift), shift)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    ink = F.grid_sample((x + 1) / 2, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return ink * 2 - 1
