"""Image files: tensors in [-1, 1] of shape (B, C, H, W) (C = 1 or 3) to PNG files and grids.

A pixel value v in [-1, 1] is written as round(255 * (v + 1) / 2), clamped to 0..255.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W) or (B, H, W, 3) uint8."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, zoom: int = 1) -> np.ndarray:
    """Tile images row-major into one uint8 array, ``nrow`` per row (default ~sqrt(B)), nearest-zoomed."""
    arr = to_uint8(images)
    b, h, w = arr.shape[:3]
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    shape = (rows * (h + pad) + pad, nrow * (w + pad) + pad) + arr.shape[3:]
    grid = np.full(shape, 128, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    if zoom > 1:
        grid = grid.repeat(zoom, axis=0).repeat(zoom, axis=1)
    return grid


def save_png(array: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def save_images(images: torch.Tensor, folder: str | Path, prefix: str = "", nrow: int | None = None,
                zoom: int | None = None) -> tuple[list[Path], Path]:
    """One PNG per image (native resolution) ``<prefix>NNN.png`` and ``<prefix>grid.png`` in folder.

    The grid is nearest-zoomed by ``zoom`` (default: so that a tile is at least 64 pixels).
    """
    folder = Path(folder)
    arr = to_uint8(images)
    zoom = zoom or max(1, 64 // max(arr.shape[1], arr.shape[2]))
    width = max(3, len(str(len(arr) - 1)))
    files = [save_png(a, folder / f"{prefix}{i:0{width}d}.png") for i, a in enumerate(arr)]
    grid = save_png(make_grid(images, nrow=nrow, zoom=zoom), folder / f"{prefix}grid.png")
    return files, grid
