"""One loader for the embedded digits model and a user's local diffusers folder of any supported family.

Every model is a diffusers pipeline folder: ``model_index.json`` plus one subfolder per component.
``load_components(path)`` opens one (default: the embedded model shipped in ``adjointdpm/assets/digits``)
- a local folder, a Hugging Face id ``org/name[@revision]`` resolved through the Hub cache
(:mod:`adjointdpm.hub`: offline with ``HF_HUB_OFFLINE=1``), or a single-file ``.safetensors`` checkpoint of
the network with ``config=`` the folder (or id) that gives everything else; safetensors weights only - and
returns a :class:`DiffusionComponents`, the same object whatever the model. The family is chosen by
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

Precision and memory (``load_components(..., dtype=, offload=, compile=)``):

* ``dtype``: every weight in that precision - ``"bf16"`` / ``"fp16"`` / ``"fp32"`` or a torch dtype;
  ``"auto"`` (the default) is bfloat16 on CUDA and float32 elsewhere. x_T (``noise``) and the sampler
  state are in it too, as in the diffusers pipelines. In float16 a VAE whose config asks for
  ``force_upcast`` (SDXL's) stays float32, as the pipelines upcast it.
* ``release_encoders()`` frees the text encoders' memory once prompts are encoded (moved to CPU memory on an
  accelerator, dropped on the CPU); the next ``encode_prompt`` moves them back or re-loads them, so prompt
  encoding always works. Call it only when nothing differentiates through the encoders any more.
* ``offload=True``: the frozen parts (text encoders, VAE) live in CPU memory under accelerate's
  ``cpu_offload`` hooks: each layer's weights come to the device only while it runs (the network stays
  on the device). Slower encoding and decoding, no device memory for them.
* ``decode`` is checkpointed when a graph is recorded (:func:`adjointdpm.vae.decode`): the backward pass
  keeps the inputs of the decoder's blocks instead of every intermediate, for one extra decoder forward.
* ``compile=True`` (or a dict of ``torch.compile`` keywords): the network's forward is compiled in place
  (``nn.Module.compile``: the module, its parameters and their names are unchanged).

Errors about the folder (missing, not a diffusers folder, an unknown pipeline class, a missing
component, pickle-only weights) raise :class:`ComponentsError` with one line naming what is wrong.
"""
from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .families import BY_NAME, BY_PIPELINE, Family, family_of
from .grid import prediction_type_of

EMBEDDED_MODEL = Path(__file__).resolve().parent / "assets" / "digits"
REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
          "fp64": torch.float64, "float64": torch.float64, "double": torch.float64}
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


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
    # how the parts were loaded (dtype, offload, ...): what re-loading a released encoder needs
    load_options: dict = field(default_factory=dict, repr=False)
    released: dict = field(default_factory=dict, repr=False)  # {encoder name: "cpu" | "free"}

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

    def decode(self, latents: torch.Tensor, checkpoint: bool = True) -> torch.Tensor:
        """Latents (what the pipeline hands to its VAE step) -> images in [-1, 1] (identity in pixel space).

        With a graph recorded and ``checkpoint`` (the default) the decoder's blocks are checkpointed. Images of a
        half-precision VAE come back in float32 (critics and losses run in float32; the cast is differentiable)."""
        images = self.family_spec.decode(self, latents, checkpoint=checkpoint)
        return images.float() if images.dtype in (torch.float16, torch.bfloat16) else images

    # ------------------------------------------------------------------ memory
    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The loaded text encoders by component name (released ones excluded)."""
        return {n: getattr(self, n) for n in ENCODERS if getattr(self, n) is not None}

    def release_encoders(self, mode: str = "auto") -> list[str]:
        """Free the text encoders' memory; the next ``encode_prompt`` brings them back. Returns their names.

        ``mode``: ``"cpu"`` moves them to CPU memory (device memory freed; moved back when needed),
        ``"free"`` drops them (re-loaded from the folder when needed), ``"auto"``: ``"cpu"`` on an
        accelerator, ``"free"`` on the CPU. Encoders under ``offload`` hooks are already off the device:
        ``"cpu"`` leaves them. Nothing may differentiate through the encoders after this call.
        """
        if mode == "auto":
            mode = "free" if self.device.type == "cpu" else "cpu"
        if mode not in ("cpu", "free"):
            raise ValueError(f"release_encoders mode must be 'auto', 'cpu' or 'free', got {mode!r}")
        names = []
        for name, enc in self.text_encoders.items():
            if mode == "free":
                setattr(self, name, None)
            elif not _is_offloaded(enc):
                enc.to("cpu")
            else:
                continue
            self.released[name] = mode
            names.append(name)
        if names:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return names

    def restore_encoders(self) -> None:
        """Bring released text encoders back on the device (re-loading dropped ones); nothing if none are."""
        if not self.released:
            return
        device, opts = self.device, self.load_options
        for name, mode in list(self.released.items()):
            if mode == "cpu":
                getattr(self, name).to(device)
            else:
                index = self.pipeline_config
                fam = self.family_spec
                (part,) = [p for p in fam.parts if p.name == name]
                enc = _load_parts(opts["root"], index, fam, opts["dtype"], only=(part,))[name]
                setattr(self, name, _place(enc, device, opts.get("offload", False)))
            del self.released[name]

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
def resolve_dtype(dtype, device="cpu") -> torch.dtype:
    """A torch dtype from ``dtype``: a torch dtype, a name (bf16, fp16, fp32, ...), or None / ``"auto"``
    (bfloat16 on CUDA, float32 elsewhere)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ComponentsError(f"unknown dtype {dtype!r}: use bf16, fp16 or fp32 (auto: bf16 on CUDA, fp32 on CPU)")
    return DTYPES[key]


def _located(path, what: str) -> Path:
    """``path`` as a local path: itself, or the snapshot of a Hugging Face id (:func:`adjointdpm.hub.resolve`)."""
    from .hub import HubError, resolve

    try:
        return resolve(path, layout="pipeline", what=what)
    except HubError as e:
        raise ComponentsError(str(e)) from None


def model_folder(path) -> Path:
    """The folder of ``path`` (None: the embedded model): a local folder or a Hugging Face id's snapshot."""
    if path is None:
        return EMBEDDED_MODEL
    p = _located(path, "model folder")
    if not p.is_dir():
        raise ComponentsError(f"model path {p} is not a folder (expected a diffusers folder with model_index.json, "
                              "or a single-file .safetensors checkpoint with config=)")
    return p


def single_file(path) -> Path | None:
    """``path`` when it is a single-file checkpoint (a .safetensors file), None when it is not a file;
    pickle checkpoints are refused."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ComponentsError(f"{p} is a pickle checkpoint ({p.suffix}), which is never loaded: convert it to "
                              ".safetensors")
    return p if p.suffix.lower() == ".safetensors" else None


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


def _part_dtype(root: Path, name: str, dtype: torch.dtype) -> torch.dtype:
    """``dtype``, except float32 for a float16 VAE whose config asks for ``force_upcast`` (as the pipelines do)."""
    if name != "vae" or dtype != torch.float16:
        return dtype
    try:
        upcast = json.loads((root / name / "config.json").read_text()).get("force_upcast", True)
    except (OSError, json.JSONDecodeError):
        upcast = True
    return torch.float32 if upcast else dtype


def _load_parts(root: Path, index: dict, fam: Family, dtype, only=None) -> dict:
    """The folder's components (``only``: those parts) in ``dtype``, on the CPU."""
    import diffusers
    import transformers

    needed = tuple(p.name for p in fam.parts if p.required)
    missing = [p.name for p in fam.parts if p.required and not _listed(index, p.name)]
    if missing:
        raise ComponentsError(f"{root / 'model_index.json'} lists no {', '.join(missing)}")
    if fam.name == "sd" and _listed(index, "text_encoder_2"):
        raise ComponentsError(f"{root} has two text encoders but model_index.json names no SDXL pipeline "
                              "(set _class_name to StableDiffusionXLPipeline)")
    present = [p for p in (fam.parts if only is None else only) if _listed(index, p.name)]
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
                parts[p.name] = cls.from_pretrained(root, subfolder=p.name, torch_dtype=_part_dtype(root, p.name, dtype),
                                                    variant=variants[p.name], **common)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ComponentsError(f"cannot load {root}: {first}") from e
    finally:
        for log, enabled in bars:
            if enabled:
                log.enable_progress_bar()
    return parts


def _is_offloaded(module: torch.nn.Module) -> bool:
    return hasattr(module, "_hf_hook")


def _place(module: torch.nn.Module, device, offload: bool) -> torch.nn.Module:
    """``module`` frozen in eval mode, on ``device``, or (``offload``) in CPU memory under accelerate's hooks
    that bring each layer's weights to ``device`` only while it runs."""
    module.eval().requires_grad_(False)
    if not offload:
        return module.to(device)
    from accelerate import cpu_offload

    return cpu_offload(module.to("cpu"), execution_device=torch.device(device))


def _single_file_network(root: Path, index: dict, fam: Family, file: Path, dtype) -> torch.nn.Module:
    """The family's network from a single-file checkpoint (its original key layout or diffusers'), with the
    config in ``root``'s network subfolder (diffusers' ``from_single_file(..., config=root)``)."""
    name = fam.network
    cls = _component_class(root, index, name, _fallback(name) if fam.name == "sd" else None)
    if not (root / name / "config.json").is_file():
        raise ComponentsError(f"{root} has no {name}/config.json for the single-file checkpoint {file}")
    if not hasattr(cls, "from_single_file"):
        raise ComponentsError(f"{cls.__name__} cannot be loaded from a single file (diffusers has no converter for it)")
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # (it warns about float32 modules when it casts, even when there are none)
    try:
        return cls.from_single_file(str(file), config=str(root), subfolder=name, torch_dtype=dtype,
                                    local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ComponentsError(f"cannot load {file} as the {name} of {root}: {first}") from e
    finally:
        logging.set_verbosity(level)


def load_components(path: str | os.PathLike | None = None, device="cpu", dtype="auto", *, config=None,
                    offload: bool = False, compile=False) -> DiffusionComponents:
    """Open a model (default: the embedded digits model) in eval mode, no grads (see the module doc).

    ``path``: a local diffusers folder, a Hugging Face id ``org/name[@revision]``, or a single-file
    ``.safetensors`` checkpoint of the network with ``config`` the folder or id holding the rest.
    ``dtype``: ``"auto"`` (bf16 on CUDA, fp32 elsewhere), ``"bf16"``, ``"fp16"``, ``"fp32"`` or a torch dtype.
    ``offload``: text encoders and VAE in CPU memory, brought to ``device`` layer by layer when called.
    ``compile``: compile the network's forward (True, or a dict of ``torch.compile`` keywords).
    """
    dtype = resolve_dtype(dtype, device)
    file = single_file(path)
    if file is None and config is not None:
        raise ComponentsError("config= is for a single-file checkpoint (a .safetensors file); "
                              f"{path} is {'the embedded model' if path is None else 'not one'}")
    if file is not None and config is None:
        raise ComponentsError(f"{file} is a single-file checkpoint: give the diffusers folder (or Hugging Face id) "
                              "that holds its configs and the other components (--config / config=)")
    root = model_folder(config if file is not None else path)
    index = _read_index(root)
    fam = _family(root, index)
    # a single file replaces the network: the folder need not hold its weights, and they are not read
    parts = _load_parts(root, index, fam, dtype, only=None if file is None else
                        tuple(p for p in fam.parts if p.name != fam.network))
    if file is not None:
        parts[fam.network] = _single_file_network(root, index, fam, file, dtype)
    for name, m in parts.items():
        if isinstance(m, torch.nn.Module):
            parts[name] = _place(m, device, offload and name != fam.network)
    scheduler = parts["scheduler"]
    prediction_type = prediction_type_of(scheduler) or "epsilon"  # flow-matching: "flow_prediction"
    comps = DiffusionComponents(
        unet=parts.get("unet"), scheduler=scheduler, text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"], vae=parts.get("vae"), prediction_type=prediction_type, path=root,
        family=fam.name, transformer=parts.get("transformer"), text_encoder_2=parts.get("text_encoder_2"),
        tokenizer_2=parts.get("tokenizer_2"), text_encoder_3=parts.get("text_encoder_3"),
        tokenizer_3=parts.get("tokenizer_3"), pipeline_config=index,
        load_options={"root": root, "dtype": dtype, "offload": bool(offload), "single_file": file})
    if compile:
        comps.network.compile(**(compile if isinstance(compile, dict) else {}))
    comps.settings = fam.default_settings(comps)
    extra = root / "adjointdpm.json"
    if extra.is_file():
        comps.settings.update(json.loads(extra.read_text()))
    return comps

