"""Differentiable VAE decoding whose backward pass does not dominate memory at high resolution.

    image = adjointdpm.vae.decode(vae, latents, checkpoint=True, tile=None)

``latents`` are what the sampler returns (scaled by the VAE's ``scaling_factor`` and shifted by its
``shift_factor`` if it has one); they are unscaled, z = latents / scaling_factor + shift_factor, and decoded by
the VAE itself (``vae.decode(z).sample``, a diffusers ``AutoencoderKL`` or anything with that interface).

* ``checkpoint=True`` (no tiles): every ResNet block, attention layer and upsampler of ``vae.decoder`` runs
  under ``torch.utils.checkpoint`` (non-reentrant). The forward pass keeps each block's input only; the
  backward pass recomputes one block at a time. The operations are the plain decode's, so the gradient is
  the plain decode's; memory drops from every intermediate of every block to the blocks' inputs plus one
  block's intermediates, for one extra decoder forward. Blocks run by hooks that move their weights (accelerate's
  offload) are recomputed to their end, so the hooks put the weights back.
* ``tile=T``: the latent is cut into T×T tiles (latent pixels) overlapping by ``overlap`` (default T/4),
  each tile decoded on its own and the tiles blended with weights w that ramp linearly across each
  overlap: image = Σ_k w_k · decode(z_k) / Σ_k w_k. With ``checkpoint=True`` each tile is checkpointed as
  a whole, so the backward pass holds one tile's intermediates, whatever the image size. A tiled decode is
  not exactly the plain one (the decoder's group norms see one tile, as in diffusers' tiled decoding);
  the gradient is exact for the tiled decode.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint


def unscale(vae, latents: torch.Tensor) -> torch.Tensor:
    """z = latents / scaling_factor + shift_factor (the VAE's own latent space)."""
    config = getattr(vae, "config", None)
    scaling = getattr(config, "scaling_factor", None) or 1.0
    shift = getattr(config, "shift_factor", None) or 0.0
    z = latents / scaling
    return z + shift if shift else z


def decode(vae, latents: torch.Tensor, *, checkpoint: bool = True, tile: int | None = None,
           overlap: int | None = None, scaled: bool = True) -> torch.Tensor:
    """The decoded image of ``latents`` (B, C, h, w), differentiably, in bounded memory (see the module doc).

    Args:
        vae: a diffusers ``AutoencoderKL`` (or anything with ``decode(z).sample`` and a ``decoder``).
        latents: the sampler's latents; ``scaled=False`` if they are already in the VAE's space.
        checkpoint: recompute in the backward pass instead of storing the decoder's intermediates.
        tile: decode in tiles of tile × tile latent pixels (None: in one piece).
        overlap: latent pixels shared by neighbouring tiles (default tile // 4).
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be (batch, channels, height, width), got shape {tuple(latents.shape)}")
    z = unscale(vae, latents) if scaled else latents
    if tile is None:
        if checkpoint and torch.is_grad_enabled():
            with checkpointed_blocks(vae.decoder):
                return vae.decode(z).sample
        return vae.decode(z).sample
    return _tiled(vae, z, tile, overlap, checkpoint)


@contextmanager
def checkpointed_blocks(decoder: torch.nn.Module):
    """Within the block, every ResNet block, attention layer and upsampler of ``decoder`` is checkpointed."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    patched = [m for m in decoder.modules() if isinstance(m, (ResnetBlock2D, Attention, Upsample2D))]
    # a module's own forward: the class's, or one a hook installed on the instance (accelerate's offload
    # hooks, which bring the weights to the device), which the checkpoint then runs (and re-runs)
    # and the hook must see the recomputation to its end, which put the weights back: no early stop there
    own = [m.__dict__.get("forward") for m in patched]
    hooked = any(hasattr(m, "_hf_hook") for m in decoder.modules())
    for m in patched:
        m.forward = partial(_checkpoint_to_the_end if hooked else _checkpoint, m.forward, use_reentrant=False)
    try:
        yield
    finally:
        for m, forward in zip(patched, own):
            if forward is None:
                del m.forward  # back to the class's forward
            else:
                m.forward = forward


def _checkpoint_to_the_end(fn, *args, **kwargs):
    """``checkpoint`` whose backward recomputation runs ``fn`` to its end (its hooks' post-forward included)."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    with set_checkpoint_early_stop(False):
        return _checkpoint(fn, *args, **kwargs)


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def _ramp(length: int, ramp: int, left: bool, right: bool, like: torch.Tensor) -> torch.Tensor:
    """Blending weights along one axis: 1 inside, rising linearly (from > 0) across a shared edge."""
    w = torch.ones(length, dtype=like.dtype, device=like.device)
    if ramp > 0:
        rise = (torch.arange(ramp, dtype=like.dtype, device=like.device) + 0.5) / ramp
        if left:
            w[:ramp] = torch.minimum(w[:ramp], rise)
        if right:
            w[-ramp:] = torch.minimum(w[-ramp:], rise.flip(0))
    return w


def _tiled(vae, z: torch.Tensor, tile: int, overlap: int | None, checkpoint: bool) -> torch.Tensor:
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive number of latent pixels, got {tile!r}")
    overlap = tile // 4 if overlap is None else overlap
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be at least 0 and smaller than tile ({tile}), got {overlap}")
    height, width = z.shape[-2:]
    ys, xs = _starts(height, tile, overlap), _starts(width, tile, overlap)

    def decode_tile(z_tile):
        return vae.decode(z_tile).sample

    run = _checkpoint_to_the_end if any(hasattr(m, "_hf_hook") for m in vae.modules()) else _checkpoint

    out = weights = None
    factor = None
    for y in ys:
        for x in xs:
            z_tile = z[..., y:y + tile, x:x + tile]
            if checkpoint and torch.is_grad_enabled():
                image = run(decode_tile, z_tile, use_reentrant=False)
            else:
                image = decode_tile(z_tile)
            if out is None:
                factor = image.shape[-1] // z_tile.shape[-1]
                out = image.new_zeros(*image.shape[:2], height * factor, width * factor)
                weights = image.new_zeros(height * factor, width * factor)
            h, w = image.shape[-2:]
            ramp = overlap * factor
            wy = _ramp(h, ramp, y > 0, y + tile < height, image)
            wx = _ramp(w, ramp, x > 0, x + tile < width, image)
            w2 = wy[:, None] * wx[None, :]
            py, px = y * factor, x * factor
            pad = (px, out.shape[-1] - px - w, py, out.shape[-2] - py - h)
            out = out + torch.nn.functional.pad(image * w2, pad)
            weights = weights + torch.nn.functional.pad(w2, pad)
    return out / weights
