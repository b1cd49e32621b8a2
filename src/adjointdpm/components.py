"""One loader for the embedded digits model and for a user's local Stable Diffusion folder.

Both are diffusers pipeline folders: ``model_index.json`` plus one subfolder per component
(``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and, for latent models, ``vae/``).
``load_components(path)`` opens either (default: the embedded model shipped in
``adjointdpm/assets/digits``) strictly offline - local folders only, safetensors weights only - and
returns a :class:`DiffusionComponents`, the same object whatever the model:

* ``encode_prompt(prompts)`` - tokenizer (padded to ``model_max_length``) then the text encoder's
  last hidden state (B, L, D), as Stable Diffusion feeds the UNet's cross-attention;
  differentiable w.r.t. the text encoder's weights (and its token embeddings).
* ``decode(latents)`` - images in [-1, 1]: ``vae.decode(z / scaling_factor)`` for latent models,
  the identity in pixel space (``vae is None``). Differentiable; no clamping.
* ``latent_shape`` (C, H, W) of x_T and ``alphas_cumprod`` (abar_t, t = 0..N-1) of the schedule.
* ``generate(prompts, ...)`` - plain text-to-image sampling with ``adjointdpm.sample``.

Errors about the folder (missing, not a diffusers folder, a missing component, pickle-only
weights) raise :class:`ComponentsError` with one line naming what is missing.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

EMBEDDED_MODEL = Path(__file__).resolve().parent / "assets" / "digits"
REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
# Defaults for folders without an adjointdpm.json (a Stable Diffusion folder).
SD_SETTINGS = {"default_guidance_scale": 7.5, "default_steps": 25, "default_solver": "dpmpp2m"}


class ComponentsError(RuntimeError):
    """A model folder cannot be loaded; the message says what is missing."""


@dataclass
class DiffusionComponents:
    unet: torch.nn.Module
    scheduler: object
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module | None
    prediction_type: str
    path: Path | None = None
    settings: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return (int(self.unet.config.in_channels), int(h), int(w))

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    @property
    def is_embedded(self) -> bool:
        return self.path is not None and self.path.resolve() == EMBEDDED_MODEL

    # ------------------------------------------------------------------ text and images
    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.tokenizer
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return ids.to(self.text_encoder.device)

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) last hidden states of the text encoder for ``prompts``."""
        return self.text_encoder(self.token_ids(prompts))[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (identity in pixel space)."""
        if self.vae is None:
            return latents
        cfg = self.vae.config
        z = latents / cfg.scaling_factor
        if getattr(cfg, "shift_factor", None):
            z = z + cfg.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample

    def noise(self, n: int, seed: int) -> torch.Tensor:
        """x_T for ``n`` images: standard normal from a CPU generator seeded with ``seed``."""
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn((n, *self.latent_shape), generator=g).to(self.device, self.dtype)

    @torch.no_grad()
    def generate(self, prompts: list[str], *, seed: int = 0, steps: int | None = None, solver: str | None = None,
                 guidance_scale: float | None = None, batch_size: int = 256,
                 x_T: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] for ``prompts`` (one image each), plain sampling, no graph.

        Image i depends only on (seed, i, prompt i): x_T is drawn for the whole list at once.
        """
        import adjointdpm as adpm

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        steps = int(steps or self.settings["default_steps"])
        solver = solver or self.settings["default_solver"]
        w = float(self.settings["default_guidance_scale"] if guidance_scale is None else guidance_scale)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        x_T = self.noise(len(prompts), seed) if x_T is None else x_T
        schedule = adpm.VPSchedule.from_alphas_cumprod(self.alphas_cumprod)
        uncond = self.encode_prompt([""]) if w != 1.0 else None
        out = []
        for i in range(0, len(prompts), batch_size):
            cond = self.encode_prompt(prompts[i:i + batch_size])
            x0 = adpm.sample(self.unet, x_T[i:i + batch_size], schedule=schedule, steps=steps, cond=cond,
                             uncond=uncond, guidance_scale=w, solver=solver, grad=None,
                             prediction_type=self.prediction_type)
            out.append(self.decode(x0).float())
        return torch.cat(out)


# ---------------------------------------------------------------------- loading
def _resolve(path) -> Path:
    if path is None:
        return EMBEDDED_MODEL
    p = Path(path).expanduser()
    if not p.exists():
        raise ComponentsError(f"model folder {p} does not exist (give a local diffusers folder; nothing is downloaded)")
    if not p.is_dir():
        raise ComponentsError(f"model path {p} is not a folder (expected a diffusers folder with model_index.json)")
    return p


def _weights(folder: Path, stem: str) -> str | None:
    """'' if ``stem``.safetensors (or its sharded index) is there, 'fp16' if only that variant is; None if none."""
    if (folder / f"{stem}.safetensors").is_file() or (folder / f"{stem}.safetensors.index.json").is_file():
        return ""
    if (folder / f"{stem}.fp16.safetensors").is_file() or (folder / f"{stem}.safetensors.index.fp16.json").is_file():
        return "fp16"
    return None


def _check_component(root: Path, name: str, stem: str | None) -> str | None:
    sub = root / name
    if not sub.is_dir():
        raise ComponentsError(f"{root} has no {name}/ folder (a diffusers folder needs {', '.join(REQUIRED)})")
    if stem is None:
        return None
    variant = _weights(sub, stem)
    if variant is None:
        pickles = sorted(p.name for p in sub.glob("*.bin")) + sorted(p.name for p in sub.glob("*.ckpt"))
        hint = f"; found only {', '.join(pickles)} (pickle weights are not loaded: convert to safetensors)" if pickles else ""
        raise ComponentsError(f"{sub} has no {stem}.safetensors{hint}")
    if not (sub / "config.json").is_file():
        raise ComponentsError(f"{sub} has no config.json")
    return variant or None


def load_components(path: str | os.PathLike | None = None, device="cpu", dtype=torch.float32) -> DiffusionComponents:
    """Open a diffusers folder (default: the embedded digits model) offline, in eval mode, no grads."""
    root = _resolve(path)
    import diffusers
    import transformers

    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ComponentsError(f"{root} has no model_index.json: not a diffusers pipeline folder")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise ComponentsError(f"{index_file} is not valid JSON ({e})") from None
    missing = [k for k in REQUIRED if not (isinstance(index.get(k), list) and index[k][1])]
    if missing:
        raise ComponentsError(f"{index_file} lists no {', '.join(missing)}")
    if isinstance(index.get("text_encoder_2"), list) and index["text_encoder_2"][1]:
        raise ComponentsError(f"{root} has two text encoders (SDXL-style); only single-encoder pipelines (SD 1.x/2.x) are supported")
    has_vae = isinstance(index.get("vae"), list) and bool(index["vae"][1])

    unet_variant = _check_component(root, "unet", "diffusion_pytorch_model")
    te_variant = _check_component(root, "text_encoder", "model")
    _check_component(root, "tokenizer", None)
    _check_component(root, "scheduler", None)
    vae_variant = _check_component(root, "vae", "diffusion_pytorch_model") if has_vae else None

    common = dict(local_files_only=True, use_safetensors=True)
    bars = [(lib.utils.logging, lib.utils.logging.is_progress_bar_enabled()) for lib in (diffusers, transformers)]
    for log, _ in bars:
        log.disable_progress_bar()  # loading a local folder takes well under a second
    try:
        unet_cls = getattr(diffusers, index["unet"][1], diffusers.UNet2DConditionModel)
        unet = unet_cls.from_pretrained(root, subfolder="unet", torch_dtype=dtype, variant=unet_variant, **common)
        te_cls = getattr(transformers, index["text_encoder"][1], transformers.CLIPTextModel)
        text_encoder = te_cls.from_pretrained(root, subfolder="text_encoder", dtype=dtype, variant=te_variant, **common)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
        sched_cls = getattr(diffusers, index["scheduler"][1], None) or diffusers.DDPMScheduler
        scheduler = sched_cls.from_pretrained(root, subfolder="scheduler", local_files_only=True)
        vae = None
        if has_vae:
            vae = diffusers.AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype,
                                                          variant=vae_variant, **common)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ComponentsError(f"cannot load {root}: {first}") from e
    finally:
        for log, enabled in bars:
            if enabled:
                log.enable_progress_bar()

    modules = [m for m in (unet, text_encoder, vae) if m is not None]
    for m in modules:
        m.to(device).eval().requires_grad_(False)
    settings = dict(SD_SETTINGS)
    extra = root / "adjointdpm.json"
    if extra.is_file():
        settings.update(json.loads(extra.read_text()))
    prediction_type = getattr(scheduler.config, "prediction_type", None) or "epsilon"
    return DiffusionComponents(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
                               vae=vae, prediction_type=prediction_type, path=root, settings=settings)


def load_critics(path: str | os.PathLike | None = None, device="cpu"):
    """The embedded critics (guide, judge, safety filter, Frechet distance) of a model folder.

    ``path`` is a model folder holding ``critics/`` (default: the embedded model) or a critics folder.
    Returns an ``adjointdpm.embedded.critics.Critics`` module (eval mode, weights frozen).
    """
    from .embedded.critics import load_critics_folder

    root = _resolve(path)
    folder = root / "critics" if (root / "critics").is_dir() else root
    if not (folder / "config.json").is_file() or not (folder / "guide.safetensors").is_file():
        raise ComponentsError(f"{root} has no critics/ folder (critics ship only with the embedded digits model)")
    try:
        return load_critics_folder(folder, device=device)
    except (FileNotFoundError, KeyError, RuntimeError) as e:
        raise ComponentsError(f"cannot load critics from {folder}: {str(e).splitlines()[0]}") from e
