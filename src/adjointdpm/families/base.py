"""What every model family shares: the component list, the latent grid, noise, VAE decoding, time grids.

A *family* is one diffusers pipeline layout (SD, SDXL, SD3, Flux, PixArt). Its class states which
components a folder must list, how the pipeline turns prompts into the network's keyword arguments
(``encode_prompt``), and how the pipeline's ``latents=`` and VAE step look. The defaults here are
those of a latent UNet / transformer family with an ``AutoencoderKL``:

* latent grid: ``height // f`` x ``width // f`` with the VAE factor ``f = 2 ** (len(block_out_channels) - 1)``,
  ``height = width = sample_size * f`` unless the settings (the folder's ``adjointdpm.json``, or the
  session's ``--height`` / ``--width``) set ``height`` / ``width``; the negative prompt is the settings'
  ``negative_prompt`` (default "");
* ``noise(n, seed)``: ``torch.randn`` from a CPU generator seeded with ``seed`` (float32 draws, then cast),
  which is what ``randn_tensor`` draws for the pipeline's ``prepare_latents`` with that generator;
* ``decode(x0)``: ``vae.decode(x0 / scaling_factor + shift_factor)`` (shift 0 when the VAE has none),
  checkpointed block by block when a graph is recorded (:func:`adjointdpm.vae.decode`);
* ``encode_prompt(prompts)``: brings released text encoders back (``restore_encoders``), then the
  family's ``encode_text``; inputs go to the network's device (offloaded encoders run there);
* ``set_timesteps(steps)``: ``scheduler.set_timesteps(steps)``, the pipeline's ``retrieve_timesteps``
  without custom grids;
* ``sampling_setup(steps, guidance_scale)``: what the engine samples with — the folder's configured
  scheduler and its grid for N steps (a PNDMScheduler's N distinct times: its list repeats t₁), sampled
  by default with the scheduler's twin (``default_settings``), the guidance scale the engine applies (with the extra
  ``encode_prompt`` keywords it implies) and the negative cond (see :class:`SamplingSetup`).

A family instance holds no state: every method takes the :class:`~adjointdpm.components.DiffusionComponents`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..grid import pndm_grid_times
from ..twins import has_twin, twin_solver


@dataclass(frozen=True)
class Part:
    """One component of a pipeline folder: its subfolder name, weight file stem (None: no weights), needed?"""

    name: str
    weights: str | None = None
    required: bool = True


UNET = Part("unet", "diffusion_pytorch_model")
TRANSFORMER = Part("transformer", "diffusion_pytorch_model")
VAE = Part("vae", "diffusion_pytorch_model")
SCHEDULER = Part("scheduler")


def text_encoder(i: int = 1, required: bool = True) -> Part:
    return Part("text_encoder" if i == 1 else f"text_encoder_{i}", "model", required)


def tokenizer(i: int = 1, required: bool = True) -> Part:
    return Part("tokenizer" if i == 1 else f"tokenizer_{i}", None, required)


def calculate_shift(seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """Dynamic-shift exponent mu, linear in the image token count: base_shift at base_seq_len, max_shift at max_seq_len."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * slope + (base_shift - slope * base_seq_len)


@dataclass(frozen=True)
class SamplingSetup:
    """How a family's model is sampled for N steps and a user's guidance settings.

    schedule:       what ``adjointdpm.sample(schedule=…)`` takes (a configured scheduler, or a NoiseSchedule)
    timesteps:      the grid's model times t_0 > … > t_{N−1} (float64)
    guidance_scale: the classifier-free guidance scale the engine applies
    encode_kwargs:  extra ``encode_prompt`` keywords (Flux: the value of its ``guidance`` input)
    uncond:         the negative cond of one image under that guidance (None without guidance, or when
                    not asked for)
    """

    schedule: Any
    timesteps: np.ndarray
    guidance_scale: float
    encode_kwargs: dict = field(default_factory=dict)
    uncond: Any = None


def negative_prompt(c) -> str:
    """The prompt classifier-free guidance steers away from: the settings' ``negative_prompt``, else ""."""
    return c.settings.get("negative_prompt") or ""


def pad_ids(tok, prompts: list[str], max_length: int, device) -> torch.Tensor:
    """Token ids (B, max_length), padded and truncated to ``max_length`` as every pipeline tokenizes."""
    ids = tok(list(prompts), padding="max_length", max_length=max_length, truncation=True,
              return_tensors="pt").input_ids
    return ids.to(device)


class Family:
    """Base family: a latent model with an AutoencoderKL and the pipeline's default time grid."""

    name = "base"
    pipelines: tuple[str, ...] = ()
    network = "unet"                       # the component that predicts the noise / velocity
    parts: tuple[Part, ...] = ()
    settings: dict = {}
    # keys of the cond dict that are not per prompt (the same for cond and uncond): under CFG the engine
    # shares a key that only ``cond`` holds, so the negative cond leaves these out
    shared_keys: tuple[str, ...] = ()

    def default_settings(self, c) -> dict:
        """The family's defaults (its pipeline's ``__call__`` defaults) with the solver that reproduces the
        folder's scheduler (:func:`adjointdpm.twins.twin_solver`); None where the scheduler has no twin
        (``DiffusionComponents.default_solver`` then raises the error that names ``--solver``)."""
        settings = dict(self.settings)
        settings["default_solver"] = twin_solver(c.scheduler) if has_twin(c.scheduler) else None
        return settings

    # ------------------------------------------------------------------ grid and noise
    def vae_scale_factor(self, c) -> int:
        return 2 ** (len(c.vae.config.block_out_channels) - 1) if c.vae is not None else 1

    def default_sample_size(self, c) -> int:
        s = c.network.config.sample_size
        return int(s if isinstance(s, int) else s[0])

    def image_size(self, c) -> tuple[int, int]:
        """(height, width) in pixels of the generated images."""
        f = self.vae_scale_factor(c)
        d = self.default_sample_size(c) * f
        return int(c.settings.get("height") or d), int(c.settings.get("width") or d)

    def image_latent_shape(self, c) -> tuple[int, int, int]:
        """(C, H, W) of the latent the VAE decodes."""
        h, w = self.image_size(c)
        f = self.vae_scale_factor(c)
        return int(c.network.config.in_channels), h // f, w // f

    def latent_shape(self, c) -> tuple[int, ...]:
        """Shape of one x_T as the pipeline takes it (``latents=``, without the batch)."""
        return self.image_latent_shape(c)

    def noise(self, c, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn((n, *self.image_latent_shape(c)), generator=g).to(c.device, c.dtype)

    # ------------------------------------------------------------------ images
    def to_vae_latents(self, c, x0: torch.Tensor) -> torch.Tensor:
        cfg = c.vae.config
        z = x0 / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        return z

    def decode(self, c, x0: torch.Tensor, checkpoint: bool = True) -> torch.Tensor:
        """``vae.decode`` of the VAE's latents, its blocks checkpointed when a graph is recorded (``checkpoint``)."""
        if c.vae is None:
            return x0
        from ..vae import decode

        return decode(c.vae, self.to_vae_latents(c, x0).to(c.vae.dtype), checkpoint=checkpoint, scaled=False)

    # ------------------------------------------------------------------ time grid
    def set_timesteps(self, c, steps: int) -> torch.Tensor:
        c.scheduler.set_timesteps(int(steps), device=c.device)
        return c.scheduler.timesteps

    # ------------------------------------------------------------------ text
    def encode_prompt(self, c, prompts: list[str], **kwargs):
        """The cond of ``prompts``, the text encoders brought back first if they were released."""
        c.restore_encoders()
        return self.encode_text(c, prompts, **kwargs)

    def encode_text(self, c, prompts: list[str], **kwargs):
        """What the family's pipeline makes of ``prompts`` for its network (the encoders are loaded)."""
        raise NotImplementedError

    def negative_cond(self, c, n: int, **kwargs):
        """The negative prompt's cond for classifier-free guidance (the settings' ``negative_prompt``, default
        the empty prompt, as the pipeline), batch ``n``, without the shared keys."""
        neg = self.encode_prompt(c, [negative_prompt(c)] * n, **kwargs)
        if isinstance(neg, dict):
            neg = {k: v for k, v in neg.items() if k not in self.shared_keys}
        return neg

    def guidance(self, c, guidance_scale: float, true_cfg_scale: float | None) -> tuple[float, dict]:
        """(CFG scale for the engine, extra encode_prompt keywords) for the user's guidance settings."""
        return guidance_scale, {}

    # ------------------------------------------------------------------ sampling
    def sampling_setup(self, c, steps: int, guidance_scale: float, true_cfg_scale: float | None = None,
                       with_uncond: bool = True) -> SamplingSetup:
        """The folder's scheduler with its grid set for ``steps`` steps as the pipeline sets it, the guidance
        of :meth:`guidance`, and (``with_uncond``) the negative cond of one image."""
        cfg_scale, encode_kwargs = self.guidance(c, float(guidance_scale), true_cfg_scale)
        cfg_scale = float(cfg_scale)
        timesteps = self.set_timesteps(c, steps).detach().cpu().double().numpy()
        timesteps = np.asarray(pndm_grid_times(c.scheduler, timesteps), dtype=np.float64)  # PLMS lists t₁ twice
        uncond = self.sampling_uncond(c, 1, cfg_scale, encode_kwargs) if with_uncond else None
        return SamplingSetup(c.scheduler, timesteps, cfg_scale, encode_kwargs, uncond)

    def sampling_uncond(self, c, n: int, guidance_scale: float, encode_kwargs: dict):
        """The negative cond of ``n`` images under ``guidance_scale`` (None at 1: guidance is off)."""
        if guidance_scale == 1.0:
            return None
        return self.negative_cond(c, int(n), **encode_kwargs)

    def prompt_tokenizer(self, c):
        """The tokenizer whose length limit the CLI checks prompts against."""
        return c.tokenizer
