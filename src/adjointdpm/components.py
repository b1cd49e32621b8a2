"""One loader for the embedded digits model and a user's local diffusers folder of any supported family.

Every model is a diffusers pipeline folder: ``model_index.json`` plus one subfolder per component.
``load_components(path)`` opens one (default: the embedded model shipped in ``adjointdpm/assets/digits``)
strictly offline - local folders only, safetensors weights only - and returns a
:class:`DiffusionComponents`, the same object whatever the model. The family is chosen by
``model_index.json``'s ``_class_name`` (see :mod:`adjointdpm.families`, one module per pipeline, each
stating how that pipeline conditions its network): SD 1.x/2.x, SDXL, SD3/3.5, Flux, PixArt-alpha/Sigma.

* ``network`` - the UNet or transformer (``unet`` / ``transformer`` name it too); ``family`` - its name.
* ``encode_prompt(prompts)`` - what the engine takes as ``cond``: the text encoder's (B, L, D) hidden
  states for SD 1.x/2.x; for the other families a dict of the network's keyword arguments, exactly
  as the family's pipeline passes them (nested ``added_cond_kwargs`` included). Differentiable
  w.r.t. the text encoders' weights. ``negative_cond(n)`` is the empty-prompt ``uncond`` for
  classifier-free guidance, as the pipeline builds it (SDXL: zeros under ``force_zeros_for_empty_prompt``).
* ``noise(n, seed)`` - x_T, exactly the tensor the pipeline takes as ``latents=`` (packed for Flux);
  ``latent_shape`` is one x_T's shape.
* ``decode(x0)`` - images in [-1, 1] from what the pipeline hands to its VAE step (Flux: unpacked
  first; then ``/ scaling_factor (+ shift_factor)``); the identity in pixel space. Differentiable; no clamping.
* ``scheduler_timesteps(steps)`` - sets the scheduler's grid for N steps as the pipeline does (dynamic
  shift ``mu`` where the scheduler asks for it) and returns ``scheduler.timesteps``.
* ``generate(prompts, ...)`` - plain text-to-image sampling with ``adjointdpm.sample``.

Errors about the folder (missing, not a diffusers folder, an unknown pipeline class, a missing
component, pickle-only weights) raise :class:`ComponentsError` with one line naming what is wrong.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .families import BY_NAME, BY_PIPELINE, Family, family_of
from .grid import prediction_type_of

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

EMBEDDED_MODEL = Path(__file__).resolve().parent / "assets" / "digits"
REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")


class ComponentsError(RuntimeError):
    """A model folder cannot be loaded; the message says what is missing."""


@dataclass
class DiffusionComponents:
    unet: torch.nn.Module | None
    scheduler: object
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module | None
    prediction_type: str
    path: Path | None = None
    settings: dict = field(default_factory=dict)
    family: str = "sd"
    transformer: torch.nn.Module | None = None
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: object = None
    pipeline_config: dict = field(default_factory=dict)  # model_index.json

    # ------------------------------------------------------------------ properties
    @property
    def family_spec(self) -> Family:
        """The family's behaviour (:mod:`adjointdpm.families`); ``family`` is its name."""
        return BY_NAME[self.family]

    @property
    def network(self) -> torch.nn.Module:
        """The denoising network: the UNet, or the transformer."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one x_T: (C, H, W), or (tokens, 4C) for Flux's packed latents."""
        return self.family_spec.latent_shape(self)

    @property
    def image_latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the latent the VAE decodes (the same as ``latent_shape`` except for Flux)."""
        return self.family_spec.image_latent_shape(self)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        if not hasattr(self.scheduler, "alphas_cumprod"):
            raise ValueError(f"{type(self.scheduler).__name__} has no alphas_cumprod (a flow-matching schedule): "
                             "pass the scheduler itself as schedule=")
        return self.scheduler.alphas_cumprod

    @property
    def is_embedded(self) -> bool:
        return self.path is not None and self.path.resolve() == EMBEDDED_MODEL

    @property
    def prompt_tokenizer(self):
        """The tokenizer whose length limit prompts must respect (the first CLIP tokenizer, or T5's)."""
        return self.family_spec.prompt_tokenizer(self)

    # ------------------------------------------------------------------ text and images
    def encode_prompt(self, prompts: list[str], **kwargs):
        """``cond`` for ``prompts``: a (B, L, D) tensor (SD 1.x/2.x) or the network's keyword arguments.

        Flux takes ``guidance_scale=`` (the value of its ``guidance`` input; default: the model's).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.family_spec.encode_prompt(self, prompts, **kwargs)

    def negative_cond(self, n: int = 1, **kwargs):
        """``uncond`` for classifier-free guidance with ``n`` images: the empty prompt as the pipeline encodes it."""
        return self.family_spec.negative_cond(self, int(n), **kwargs)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (what the pipeline hands to its VAE step) -> images in [-1, 1] (identity in pixel space)."""
        return self.family_spec.decode(self, latents)

    def noise(self, n: int, seed: int) -> torch.Tensor:
        """x_T for ``n`` images: standard normal from a CPU generator seeded with ``seed`` (packed for Flux)."""
        return self.family_spec.noise(self, n, seed)

    def default_solver(self) -> str:
        """The solver sampled with when none is asked for: the folder's (``adjointdpm.json``) or its
        scheduler's twin; a scheduler without one gets the error naming the supported classes and ``--solver``."""
        from .twins import twin_solver

        return self.settings.get("default_solver") or twin_solver(self.scheduler)

    def scheduler_timesteps(self, steps: int) -> torch.Tensor:
        """Set the scheduler's grid for ``steps`` steps as the family's pipeline does; its timesteps."""
        return self.family_spec.set_timesteps(self, steps)

    @torch.no_grad()
    def generate(self, prompts: list[str], *, seed: int = 0, steps: int | None = None, solver: str | None = None,
                 eta: float = 0.0, guidance_scale: float | None = None, batch_size: int = 256,
                 x_T: torch.Tensor | None = None, true_cfg_scale: float | None = None,
                 decode: bool = True) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] for ``prompts`` (one image each), plain sampling, no graph.

        Image i depends only on (seed, i, prompt i): x_T is drawn for the whole list at once, and a
        stochastic solver (``solver="ddpm"``, …, or ``"ddim"`` with ``eta`` > 0) injects image i's own
        seeded stream (:func:`adjointdpm.stochastic.sample_streams`).
        For guidance-distilled Flux, ``guidance_scale`` is the network's ``guidance`` input and
        ``true_cfg_scale`` (default 1: off) the classifier-free guidance scale. ``decode=False``
        returns x_0 itself, what the pipeline hands to its VAE step (its ``output_type="latent"``).
        """
        import adjointdpm as adpm

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        steps = int(steps or self.settings["default_steps"])
        solver = solver or self.default_solver()
        w = float(self.settings["default_guidance_scale"] if guidance_scale is None else guidance_scale)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        x_T = self.noise(len(prompts), seed) if x_T is None else x_T
        from .solvers import solver_name
        from .stochastic import is_stochastic, sample_streams

        streams = sample_streams(seed, range(len(prompts))) if is_stochastic(solver_name(solver), eta) else None
        noise_of = lambda rows: None if streams is None else streams.rows(rows)  # noqa: E731
        family = self.family_spec
        setup = family.sampling_setup(self, steps, w, true_cfg_scale, with_uncond=False)
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            cond = self.encode_prompt(chunk, **setup.encode_kwargs)
            uncond = family.sampling_uncond(self, len(chunk), setup.guidance_scale, setup.encode_kwargs)
            x0 = adpm.sample(self.network, x_T[i:i + batch_size], schedule=setup.schedule, timesteps=setup.timesteps,
                             cond=cond, uncond=uncond, guidance_scale=setup.guidance_scale, solver=solver, eta=eta,
                             noise=noise_of(slice(i, i + batch_size)), grad=None,
                             prediction_type=self.prediction_type)
            out.append(self.decode(x0).float() if decode else x0)
        return torch.cat(out)


# ---------------------------------------------------------------------- loading
def model_folder(path) -> Path:
    """The folder of ``path`` (None: the embedded model), which must exist (nothing is downloaded)."""
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


def _check_component(root: Path, name: str, stem: str | None, needed: tuple[str, ...] = REQUIRED) -> str | None:
    sub = root / name
    if not sub.is_dir():
        raise ComponentsError(f"{root} has no {name}/ folder (a diffusers folder needs {', '.join(needed)})")
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


def _read_index(root: Path) -> dict:
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ComponentsError(f"{root} has no model_index.json: not a diffusers pipeline folder")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise ComponentsError(f"{index_file} is not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise ComponentsError(f"{index_file} is not a JSON object")
    return index


def _family(root: Path, index: dict) -> Family:
    name = index.get("_class_name")
    fam = family_of(name)
    if fam is None:
        raise ComponentsError(f"{root} holds a {name}, which is not supported; supported pipelines: "
                              f"{', '.join(sorted(BY_PIPELINE))}")
    return fam


def _listed(index: dict, name: str) -> bool:
    return isinstance(index.get(name), list) and len(index[name]) == 2 and bool(index[name][1])


def _component_class(root: Path, index: dict, name: str, fallback):
    import diffusers
    import transformers

    lib, cls_name = index[name]
    cls = getattr(transformers if lib == "transformers" else diffusers, cls_name, None)
    if cls is None and fallback is not None:
        cls = fallback
    if cls is None:
        raise ComponentsError(f"{root}/model_index.json names {lib}.{cls_name} for {name}, which the installed "
                              f"{lib} does not have")
    return cls


def _fallback(name: str):
    """The class to use when model_index.json names one the installed libraries lack (as before: SD's)."""
    import diffusers
    import transformers

    return {"unet": diffusers.UNet2DConditionModel, "text_encoder": transformers.CLIPTextModel,
            "scheduler": diffusers.DDPMScheduler, "vae": diffusers.AutoencoderKL}.get(name)


def _load_parts(root: Path, index: dict, fam: Family, dtype) -> dict:
    import diffusers
    import transformers

    needed = tuple(p.name for p in fam.parts if p.required)
    missing = [p.name for p in fam.parts if p.required and not _listed(index, p.name)]
    if missing:
        raise ComponentsError(f"{root / 'model_index.json'} lists no {', '.join(missing)}")
    if fam.name == "sd" and _listed(index, "text_encoder_2"):
        raise ComponentsError(f"{root} has two text encoders but model_index.json names no SDXL pipeline "
                              "(set _class_name to StableDiffusionXLPipeline)")
    present = [p for p in fam.parts if _listed(index, p.name)]
    variants = {p.name: _check_component(root, p.name, p.weights, needed) for p in present}

    common = dict(local_files_only=True, use_safetensors=True)
    bars = [(lib.utils.logging, lib.utils.logging.is_progress_bar_enabled()) for lib in (diffusers, transformers)]
    for log, _ in bars:
        log.disable_progress_bar()  # loading a local folder takes well under a second
    parts = {}
    try:
        for p in present:
            if fam.name == "sd" and p.name == "tokenizer":
                cls = transformers.CLIPTokenizer  # (what SD folders always loaded)
            else:
                cls = _component_class(root, index, p.name, _fallback(p.name) if fam.name == "sd" else None)
            if p.weights is None:  # tokenizers and the scheduler: configs only
                parts[p.name] = cls.from_pretrained(root, subfolder=p.name, local_files_only=True)
            elif p.name.startswith("text_encoder"):
                parts[p.name] = cls.from_pretrained(root, subfolder=p.name, dtype=dtype, variant=variants[p.name],
                                                    **common)
            else:
                parts[p.name] = cls.from_pretrained(root, subfolder=p.name, torch_dtype=dtype,
                                                    variant=variants[p.name], **common)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ComponentsError(f"cannot load {root}: {first}") from e
    finally:
        for log, enabled in bars:
            if enabled:
                log.enable_progress_bar()
    return parts


def load_components(path: str | os.PathLike | None = None, device="cpu", dtype=torch.float32) -> DiffusionComponents:
    """Open a diffusers folder (default: the embedded digits model) offline, in eval mode, no grads."""
    root = model_folder(path)
    index = _read_index(root)
    fam = _family(root, index)
    parts = _load_parts(root, index, fam, dtype)
    for m in parts.values():
        if isinstance(m, torch.nn.Module):
            m.to(device).eval().requires_grad_(False)
    scheduler = parts["scheduler"]
    prediction_type = prediction_type_of(scheduler) or "epsilon"  # flow-matching: "flow_prediction"
    comps = DiffusionComponents(
        unet=parts.get("unet"), scheduler=scheduler, text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"], vae=parts.get("vae"), prediction_type=prediction_type, path=root,
        family=fam.name, transformer=parts.get("transformer"), text_encoder_2=parts.get("text_encoder_2"),
        tokenizer_2=parts.get("tokenizer_2"), text_encoder_3=parts.get("text_encoder_3"),
        tokenizer_3=parts.get("tokenizer_3"), pipeline_config=index)
    comps.settings = fam.default_settings(comps)
    extra = root / "adjointdpm.json"
    if extra.is_file():
        comps.settings.update(json.loads(extra.read_text()))
    return comps

