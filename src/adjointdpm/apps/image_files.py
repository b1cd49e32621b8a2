"""Image files as the applications' inputs (a style reference, target images), and the size a model's images
have: read as (1, C, H, W) tensors in [-1, 1], with one clear error for a missing, unreadable, wrongly sized
or unusual-mode file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import UserInputError

IMAGE_MODES = ("L", "RGB", "RGBA", "LA")


def read_image(path: str | Path, channels: int, size: tuple[int, int] | None, *, what: str,
               resize: bool = False) -> torch.Tensor:
    """An image file as a (1, channels, H, W) tensor in [-1, 1].

    ``size`` (H, W): the required size; with ``resize=True`` the image is resized to it instead of rejected.
    Modes other than L/LA/RGB/RGBA (palette, CMYK, 16-bit, …) are rejected with one clear line.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserInputError(f"{what} {path} does not exist")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise UserInputError(f"{what} {path} is not a readable image ({type(e).__name__})") from None
    if img.mode not in IMAGE_MODES:
        raise UserInputError(f"{what} {path} has mode {img.mode}; use an 8-bit greyscale (L) or RGB image")
    if size is not None and (img.height, img.width) != tuple(size):
        if not resize:
            raise UserInputError(f"{what} {path} is {img.width}x{img.height}; this model makes "
                                 f"{size[1]}x{size[0]} images: resize it first")
        img = img.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    img = img.convert("L" if channels == 1 else "RGB")
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 127.5 - 1.0
    arr = arr[None, None] if channels == 1 else arr.permute(2, 0, 1)[None]
    return arr


def image_shape(comps) -> tuple[int, int, int]:
    """(C, H, W) of the decoded images of a model (:class:`~adjointdpm.components.DiffusionComponents`)."""
    c, h, w = comps.image_latent_shape
    if comps.vae is None:
        return c, h, w
    vae = comps.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return int(vae.config.out_channels), h * factor, w * factor
