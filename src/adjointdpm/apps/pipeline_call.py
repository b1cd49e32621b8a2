"""``pipeline_call.json``: the diffusers call that makes a run's ``after/`` images, and :func:`replay`, which makes it.

Every application writes, beside its tensors, one JSON object::

    {"pipeline": "StableDiffusionPipeline",              # the diffusers pipeline class
     "from_pretrained": {"safety_checker": null, ...},   # keywords of its from_pretrained (may be empty)
     "scheduler": null | {"class": "...", "config": {...}},  # null: the folder's own scheduler
     "lora": "." | null,                                 # a LoRA folder, relative to the output folder
     "components": {"unet": "unet"},                     # replaced components (full fine-tuning), relative
     "kwargs": {"prompt": [...], "timesteps": [...], "guidance_scale": 7.5, "height": 512, ...},
     "tensors": {"latents": "latents.safetensors:latents", ...},
     "exact": true, "notes": []}

and :func:`replay` does exactly what a diffusers user would: ``<pipeline>.from_pretrained(model folder)``, the
scheduler set where one is given, ``load_lora_weights`` where there is a LoRA, the tensors loaded from their
safetensors files, and the pipeline called with ``kwargs`` plus those tensors. The images are ``after/`` to
the 8-bit rounding of its PNGs. The tensors are the run's own files, except optimised prompt embeddings on
SD3 and Flux, whose pipelines take given embeddings as they are: those are written repeated per image in
``pipeline_call.safetensors``. ``exact`` false says where the images cannot be ``after/`` and ``notes`` says
why: a stochastic solver's injected noises are no pipeline argument, a model time between integers is rounded
by diffusers' schedulers, a ``--start-step`` or a ``--solver`` other than the folder's scheduler has no
pipeline twin.

How the run sampled is read off the session in one place, :func:`sampling_call`: on SD 1.x/2.x folders and the
embedded model the engine samples the VP path at N uniform model times with the chosen solver, which the
pipeline reproduces with the solver's scheduler twin and explicit ``timesteps``; on every other family the
session samples with the folder's own scheduler and grid, so the pipeline's own scheduler and
``num_inference_steps`` reproduce it. The embedded digits model is a pixel-space ``StableDiffusionPipeline``
without a VAE: its call asks for ``output_type="latent"`` and its images are those latents, in [-1, 1].
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FILE = "pipeline_call.json"

#: the diffusers scheduler that takes the engine solver's steps on a VP path at given integer timesteps
SOLVER_TWINS = {
    "dpmpp2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                "final_sigmas_type": "zero", "use_karras_sigmas": False,
                                                "use_exponential_sigmas": False, "use_beta_sigmas": False,
                                                "use_lu_lambdas": False, "thresholding": False}),
    "ddim": ("EulerDiscreteScheduler", {"final_sigmas_type": "zero", "use_karras_sigmas": False,
                                        "use_exponential_sigmas": False, "use_beta_sigmas": False,
                                        "interpolation_type": "linear", "timestep_type": "discrete"}),
    "heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False, "use_exponential_sigmas": False,
                                       "use_beta_sigmas": False}),
    # stochastic solvers: the pipeline draws its own injected noises (not exact)
    "ddpm": ("DDPMScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                    "final_sigmas_type": "zero"}),
    "lcm": ("LCMScheduler", {}),
    "ddim_eta": ("DDIMScheduler", {}),
}

#: ``__call__`` keywords a family's pipeline needs to sample as the engine does, besides the prompt
MAX_SEQUENCE_FAMILIES = ("flux", "sd3", "pixart")
PIXART_CALL = {"use_resolution_binning": False, "clean_caption": False}


@dataclass
class SamplingCall:
    """How the pipeline reproduces the session's sampler: the scheduler (None: the folder's own), the grid
    keywords, whether the replay is exact, and why not."""

    scheduler: dict | None
    kwargs: dict
    exact: bool = True
    notes: list[str] = field(default_factory=list)


def _json_config(config) -> dict:
    out = {}
    for key, value in dict(config).items():
        if key.startswith("_"):
            continue
        out[key] = value.tolist() if isinstance(value, np.ndarray) else list(value) if isinstance(value, tuple) else value
    return json.loads(json.dumps(out, default=str))


def sampling_call(session, start: int = 0) -> SamplingCall:
    """The scheduler, the grid keywords and the guidance keywords that make the pipeline sample as ``session``
    does from step ``start`` (the one place that reads the session's schedule, grid and solver)."""
    from ..solvers import solver_name

    comps = session.comps
    grid = np.asarray(session.timesteps(start), dtype=np.float64)
    notes = []
    if session.stochastic:
        notes.append(f"--solver {session.solver} injects noise at every step: the pipeline draws its own (the "
                     "run's injected noises are no pipeline argument), so its images differ")
    from ..families.sd import UNIFORM_GRID

    if comps.settings.get("timesteps") == UNIFORM_GRID:  # a model's own recipe: N uniform times, the chosen solver
        name = solver_name(session.solver)
        twin = "ddim_eta" if name == "ddim" and session.stochastic else name
        cls, extra = SOLVER_TWINS.get(twin, SOLVER_TWINS["dpmpp2m"])
        if twin not in SOLVER_TWINS:
            notes.append(f"--solver {session.solver} has no diffusers scheduler twin")
        scheduler = {"class": cls, "config": {**_json_config(comps.scheduler.config), **extra}}
        ints = np.round(grid).astype(np.int64)
        if not np.allclose(grid, ints, rtol=0, atol=1e-6):
            notes.append("the grid has model times between integers, which diffusers' schedulers round: choose "
                         "--steps N with N − 1 dividing the training range (e.g. 4, 10, 28 for 1000 steps) for an "
                         "exact replay")
        kwargs = {"timesteps": [int(t) for t in ints]}
        if twin == "ddim_eta":
            kwargs["eta"] = float(session.eta)
    else:  # the folder's own scheduler and grid, as its pipeline sets them
        scheduler = None
        default = comps.default_solver()
        if solver_name(session.solver) != solver_name(default):
            notes.append(f"--solver {session.solver} is not the folder's scheduler "
                         f"({type(comps.scheduler).__name__}, solver {default}): the pipeline samples with its own")
        if start > 0:
            notes.append(f"--start-step {start}: the pipeline starts from x_T, not from the sampler's state")
        kwargs = {"num_inference_steps": int(session.steps)}
    kwargs.update(guidance_kwargs(session))
    return SamplingCall(scheduler, kwargs, exact=not notes, notes=notes)


def guidance_kwargs(session) -> dict:
    """The pipeline's guidance keywords for the session's guidance (Flux: the distilled ``guidance`` input as
    ``guidance_scale``, classifier-free guidance as ``true_cfg_scale``)."""
    w = float(session.guidance_scale)
    if session.comps.family != "flux":
        return {"guidance_scale": w}
    out = {}
    distilled = session.encode_kwargs.get("guidance_scale")
    if distilled is not None:
        out["guidance_scale"] = float(distilled)
    if w != 1.0:
        out["true_cfg_scale"] = w
    return out


def pipeline_call(session, *, tensors: dict[str, str], prompts: list[str] | None = None,
                  num_images_per_prompt: int | None = None, lora: str | None = None,
                  components: dict[str, str] | None = None, start: int = 0, notes: list[str] = (),
                  extra_tensors: dict | None = None) -> dict:
    """The ``pipeline_call.json`` object of a run of ``session``: ``tensors`` {pipeline keyword:
    "FILE.safetensors:KEY"} (the latents, optimised embeddings), ``prompts`` (one per image; None when the
    embeddings are given), ``lora`` / ``components`` relative to the output folder; ``extra_tensors``: what
    :func:`write` saves as ``pipeline_call.safetensors`` (see :func:`given_embeddings`)."""
    comps = session.comps
    sampling = sampling_call(session, start)
    pipeline = comps.pipeline_config.get("_class_name") or "StableDiffusionPipeline"
    load = {}
    kwargs = dict(sampling.kwargs)
    if comps.family == "sd":
        pipeline = "StableDiffusionPipeline"  # (the embedded model is this pipeline in pixel space)
        load.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if comps.vae is None:
            load["vae"] = None
            kwargs["output_type"] = "latent"
    if prompts is not None:
        kwargs["prompt"] = list(prompts)
        negative = getattr(session, "negative_prompt", None)
        if negative is not None or "true_cfg_scale" in kwargs:
            kwargs["negative_prompt"] = [negative or ""] * len(prompts)
    if "negative_prompt_embeds" in tensors:  # (PixArt's default negative prompt "" would clash with them)
        kwargs["negative_prompt"] = None
    if num_images_per_prompt is not None:
        kwargs["num_images_per_prompt"] = int(num_images_per_prompt)
    height, width = comps.family_spec.image_size(comps)
    kwargs.update(height=int(height), width=int(width))
    if comps.family in MAX_SEQUENCE_FAMILIES and "max_sequence_length" in comps.settings:
        kwargs["max_sequence_length"] = int(comps.settings["max_sequence_length"])
    if comps.family == "pixart":
        kwargs.update(PIXART_CALL)
    all_notes = [*sampling.notes, *notes]
    call = {"pipeline": pipeline, "from_pretrained": load, "scheduler": sampling.scheduler, "lora": lora,
            "components": dict(components or {}), "kwargs": kwargs, "tensors": dict(tensors),
            "exact": not all_notes, "notes": all_notes}
    if extra_tensors:
        call["_extra_tensors"] = extra_tensors  # (not JSON: write saves them)
    return call


#: families whose pipeline repeats given prompt embeddings ``num_images_per_prompt`` times (SD3's and Flux's
#: use given embeddings as they are: their call gets them repeated per image, in pipeline_call.safetensors)
REPEATS_GIVEN_EMBEDDINGS = ("sd", "sdxl", "pixart")
EXTRA_FILE = "pipeline_call.safetensors"


def given_embeddings(session, cond, file: str, n: int) -> tuple[dict[str, str], dict, int | None]:
    """How a call passes optimised embeddings ``cond`` (saved in ``file`` under the pipeline's names, with the
    session's negative ones) for ``n`` images: (tensor references, tensors to write to
    ``pipeline_call.safetensors``, ``num_images_per_prompt``)."""
    from .prompt_embeddings import pipeline_tensors

    tensors = {**pipeline_tensors(cond, session.uncond), **attention_masks(cond, session.uncond)}
    if session.comps.family in REPEATS_GIVEN_EMBEDDINGS:
        return {k: f"{file}:{k}" for k in tensors}, {}, n
    repeated = {k: (t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t).contiguous() for k, t in tensors.items()}
    return {k: f"{EXTRA_FILE}:{k}" for k in repeated}, repeated, None


def attention_masks(cond, uncond=None) -> dict[str, torch.Tensor]:
    """The prompt attention masks a pipeline needs beside given embeddings (PixArt's ``prompt_attention_mask``
    and ``negative_prompt_attention_mask``), from the conditionings' ``encoder_attention_mask``."""
    out = {}
    for prefix, tree in (("", cond), ("negative_", uncond)):
        mask = tree.get("encoder_attention_mask") if isinstance(tree, dict) else None
        if isinstance(mask, torch.Tensor):
            out[f"{prefix}prompt_attention_mask"] = mask.detach().cpu().contiguous()
    return out


def write(out: Path, call: dict) -> str:
    """Write ``call`` as ``out/pipeline_call.json`` (and its extra tensors as ``pipeline_call.safetensors``); its
    name relative to ``out``."""
    from .checkpoint import atomic_write_json

    call = dict(call)
    extra = call.pop("_extra_tensors", None)
    if extra:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(Path(out) / EXTRA_FILE))
    atomic_write_json(Path(out) / FILE, call)
    return FILE


# ------------------------------------------------------------------------------------- replay
def load_call(out) -> dict:
    from .errors import UserInputError

    path = Path(out).expanduser() / FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot read {path}: {e}") from None


def load_tensors(out, call: dict, device="cpu") -> dict[str, torch.Tensor]:
    """The call's tensors {pipeline keyword: tensor}, each read from its ``FILE.safetensors:KEY``."""
    from safetensors.torch import load_file

    files: dict[str, dict] = {}
    tensors = {}
    for kwarg, ref in call["tensors"].items():
        name, key = ref.rsplit(":", 1)
        if name not in files:
            files[name] = load_file(str(Path(out) / name))
        tensors[kwarg] = files[name][key].to(device)
    return tensors


def load_pipeline(out, model=None, device="cpu", dtype: torch.dtype | None = None):
    """The call's pipeline, as a diffusers user builds it: ``from_pretrained`` of the model folder (default:
    the run's own, from summary.json), its scheduler, its LoRA and replaced components."""
    import diffusers

    out = Path(out).expanduser()
    call = load_call(out)
    folder = model_of_run(out) if model is None else model
    folder = Path(folder).expanduser() if Path(folder).expanduser().exists() else folder  # (else a hub id)
    kw = {"local_files_only": True, **({"torch_dtype": dtype} if dtype is not None else {})}
    for name, rel in call.get("components", {}).items():
        cls = getattr(diffusers, "UNet2DConditionModel" if name == "unet" else _transformer_class(folder))
        kw[name] = cls.from_pretrained(out / rel, local_files_only=True)
    pipe = getattr(diffusers, call["pipeline"]).from_pretrained(folder, **call.get("from_pretrained", {}), **kw)
    if call.get("scheduler"):
        s = call["scheduler"]
        pipe.scheduler = getattr(diffusers, s["class"]).from_config(s["config"])
    if call.get("lora"):
        pipe.load_lora_weights(out / call["lora"])
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), call


def replay(out, model=None, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """The images (B, 3, H, W) in [0, 1] that the diffusers pipeline makes from ``out/pipeline_call.json``:
    they are ``out/after/`` to the 8-bit rounding of its PNGs when the call is ``exact``."""
    pipe, call = load_pipeline(out, model, device, dtype)
    kwargs = {**call["kwargs"], **load_tensors(out, call, device)}
    kwargs.setdefault("output_type", "pt")
    with torch.no_grad():
        images = pipe(**kwargs).images
    if call["kwargs"].get("output_type") == "latent":  # a pixel-space model: the latents are the images in [-1, 1]
        images = images / 2 + 0.5
    return images.float().clamp(0, 1).cpu()


def model_of_run(out: Path) -> Path | str:
    """The model folder a run used (summary.json's ``settings.model``, a sample's sample.json ``model``)."""
    from ..components import EMBEDDED_MODEL
    from .errors import UserInputError

    for name, keys in (("summary.json", ("settings", "model")), ("sample.json", ("model",))):
        try:
            model = json.loads((Path(out) / name).read_text())
            for key in keys:
                model = model[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return EMBEDDED_MODEL if model == "embedded" else model
    raise UserInputError(f"{out} has no summary.json or sample.json naming its model: pass the model folder")


def _transformer_class(folder: Path) -> str:
    cfg = json.loads((Path(folder) / "transformer" / "config.json").read_text())
    return cfg["_class_name"]
