"""``adjointdpm sample``: text-to-image generation with the embedded model or a local diffusers folder, and a
look at any run's output without writing Python.

``--model`` opens an SD 1.x/2.x, SDXL, SD3/3.5, Flux or PixArt-alpha/Sigma pipeline folder, a Hugging Face
id (through its cache) or a single-file network checkpoint with ``--config`` (safetensors only); ``--dtype``,
``--offload`` and ``--compile`` as on every command; steps, solver and guidance scale default to the model's
(the solver that reproduces the folder's scheduler); ``--height``, ``--width``, ``--max-sequence-length`` and
``--negative-prompt`` as the application commands take them.

``--latents FILE[:KEY]`` samples from saved noises instead of seeded ones (guide's ``latents.safetensors``,
audit's ``attack.safetensors``, stylize's ``eval_latents.safetensors``; one image per row); ``--embedding
FILE`` conditions on saved prompt embeddings instead of the prompt (invert's ``embedding.safetensors``, the
pipeline's names: ``prompt_embeds``, ``pooled_prompt_embeds``, ``negative_prompt_embeds``, …).

Writes one PNG per image (``000.png`` ...), ``grid.png``, ``sample.json`` (the settings used),
``latents.safetensors`` (the x_T of every image) and ``pipeline_call.json`` (the diffusers call that makes
the same images, :mod:`adjointdpm.apps.pipeline_call`) into ``--out``. Seeded x_T is drawn from a CPU
generator seeded with ``--seed``. Nothing is written before the arguments are checked; an earlier sample in
``--out`` is replaced only with ``--overwrite``. ``--lora DIR`` loads
fine-tuned weights first (a ``finetune`` or ``stylize`` run's output: its LoRA or its ``unet/`` folder).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from adjointdpm.apps.options import ConsoleOptions, EngineOptions, typer_option


def sample(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help='Text prompt, e.g. "a handwritten digit seven" (not with --embedding).'),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created)."),
    num_images: Optional[int] = typer.Option(None, "--num-images", "-n", min=1, max=4096, help="Number of images (default: 16, or one per row of --latents)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial noise."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, max=1000, help="Solver steps (default: the model's; 20 for the embedded model)."),
    solver: Optional[str] = typer.Option(None, "--solver", help="ODE solver: ddim (Euler; FlowMatchEuler's step on flow models), dpmpp2m, heun, pndm or unipc (default: the model's scheduler's twin); stochastic: ddpm, euler_ancestral, dpmpp2m_sde, lcm, or ddim with --eta > 0 (image i's injected noises from its own stream of --seed)."),
    eta: float = typer.Option(0.0, "--eta", help="DDIM's eta in [0, 1] (--solver ddim only): 0 deterministic, 1 DDPM's posterior noise."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", "-g", help="Classifier-free guidance scale (default: the model's; guidance-distilled Flux: the guidance it is given)."),
    model: Optional[Path] = typer_option(EngineOptions, "model"),
    config: Optional[Path] = typer_option(EngineOptions, "config"),
    dtype: str = typer_option(EngineOptions, "dtype"),
    offload: bool = typer_option(EngineOptions, "offload"),
    compile: bool = typer_option(EngineOptions, "compile"),
    height: Optional[int] = typer_option(EngineOptions, "height"),
    width: Optional[int] = typer_option(EngineOptions, "width"),
    max_sequence_length: Optional[int] = typer_option(EngineOptions, "max_sequence_length"),
    negative_prompt: Optional[str] = typer_option(EngineOptions, "negative_prompt"),
    latents: Optional[str] = typer.Option(None, "--latents", help="Sample from these noises: FILE.safetensors or FILE.safetensors:KEY (default key: latents), one image per row."),
    embedding: Optional[Path] = typer.Option(None, "--embedding", help="Condition on these prompt embeddings (FILE.safetensors with the pipeline's names: prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, …) instead of --prompt."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="Sample with fine-tuned weights: the --out folder of a finetune or stylize run (its pytorch_lora_weights.safetensors, or its unet/ folder)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per network batch."),
    device: str = typer.Option("cpu", "--device", help='torch device, e.g. "cpu" or "cuda".'),
    threads: int = typer.Option(0, "--threads", min=0, help="torch CPU threads (0: torch's choice; 1 is best on a busy machine)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier sample in --out."),
    debug: bool = typer_option(ConsoleOptions, "debug"),
) -> None:
    """Generate images from a text prompt, or from a run's saved noises and embeddings."""
    del debug  # (acted on by adjointdpm.cli.run, around every command)
    import torch

    import adjointdpm as adpm
    from adjointdpm.apps.checks import check_writable
    from adjointdpm.apps.errors import UserInputError
    from adjointdpm.apps.outputs import check_out
    from adjointdpm.apps.session import Session
    from adjointdpm.images import save_images

    known = [*adpm.SOLVERS, *adpm.STOCHASTIC_SOLVER_NAMES]
    if solver is not None and solver not in known:
        raise UserInputError(f"unknown solver {solver!r}; choose one of {', '.join(known)}")
    if eta != 0.0 and solver != "ddim":
        raise UserInputError(f"--eta applies to --solver ddim only, got --solver {solver or 'the default'} with --eta {eta:g}")
    if not 0.0 <= eta <= 1.0:
        raise UserInputError(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM's posterior noise), got {eta:g}")
    if guidance_scale is not None and not (0.0 <= guidance_scale <= 100.0):
        raise UserInputError(f"--guidance-scale must be in [0, 100], got {guidance_scale}")
    if (prompt is None) == (embedding is None):
        raise UserInputError("give --prompt or --embedding (one of them)")
    if lora is not None and not lora.expanduser().is_dir():
        raise UserInputError(f"--lora {lora} is not a folder (give the --out folder of a finetune or stylize run)")
    out = check_out(out, overwrite=True)  # a folder, writable; nothing created yet
    earlier = (out / "sample.json").is_file()
    if earlier and not overwrite:
        raise UserInputError(f"--out {out} holds an earlier sample: pass --overwrite to replace it, or choose "
                             "another --out")
    x_given = None if latents is None else read_tensor(latents, "latents", "--latents")
    emb_given = None if embedding is None else read_file(embedding, "--embedding")

    if threads:
        torch.set_num_threads(threads)
    session = Session(EngineOptions(model=model, config=config, dtype=dtype, offload=offload, compile=compile,
                                    solver=solver, eta=eta, steps=steps, guidance_scale=guidance_scale,
                                    device=device, height=height, width=width, max_sequence_length=max_sequence_length,
                                    negative_prompt=negative_prompt))
    if lora is not None:
        from adjointdpm.apps.weights import load_weights

        load_weights(session.comps, lora)
    n = num_images or (x_given.shape[0] if x_given is not None else 16)
    if x_given is not None:
        shape = (n, *session.comps.latent_shape)
        if tuple(x_given.shape) != shape:
            raise UserInputError(f"--latents {latents} has shape {tuple(x_given.shape)}; this model and size take "
                                 f"{shape} (one row per image)")
        x_T = x_given.to(session.device, session.comps.dtype)
    else:
        x_T = session.noise(n, seed)
    if emb_given is not None:
        cond = embeddings_as_cond(session, emb_given, embedding)
    else:
        session.check_prompt(prompt)
        cond = session.encode([prompt])
    images = session.generate(x_T, cond, batch_size=batch_size, noise=session.noise_streams(range(n), seed))

    out = check_writable(out)  # (created now: every argument was checked)
    if earlier:  # (--overwrite: the earlier sample's images, which may be more than this one's)
        for old in out.glob("[0-9]*.png"):
            old.unlink()
    files, grid = save_images(images, out)
    from safetensors.torch import save_file

    save_file({"latents": x_T.detach().cpu().contiguous()}, str(out / "latents.safetensors"))
    if emb_given is not None:
        save_file({k: v.contiguous() for k, v in emb_given.items()}, str(out / "embedding.safetensors"))
    lora_file = None if lora is None else lora.expanduser() / "pytorch_lora_weights.safetensors"
    lora_rel = os.path.relpath(lora_file.parent, out) if lora_file is not None and lora_file.is_file() else None
    call = sample_pipeline_call(session, prompt, emb_given, n, lora=lora_rel)
    from adjointdpm.apps.pipeline_call import write

    write(out, call)
    meta = {
        "prompt": prompt, "embedding": None if embedding is None else str(embedding),
        "latents": latents, "num_images": n, "seed": seed, "steps": session.steps, "solver": session.solver,
        "eta": eta,
        "guidance_scale": session.comps.settings["default_guidance_scale"] if guidance_scale is None else guidance_scale, **session.image_options,
        "model": str(session.comps.path), "dtype": str(session.comps.dtype).removeprefix("torch."), "files": [f.name for f in files], "grid": grid.name,
        "lora": None if lora is None else str(lora), "x_T": "latents.safetensors", "pipeline_call": "pipeline_call.json",
    }
    (out / "sample.json").write_text(json.dumps(meta, indent=2) + "\n")
    typer.echo(f"wrote {len(files)} images and {grid.name} to {out}")


def read_file(path: Path, flag: str) -> dict:
    """The tensors of a safetensors file (CPU); one clear error otherwise."""
    from safetensors.torch import load_file

    from adjointdpm.apps.errors import UserInputError

    path = Path(path).expanduser()
    try:
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError) as e:
        raise UserInputError(f"{flag} {path}: not a readable safetensors file ({e})") from None


def read_tensor(spec: str, default_key: str, flag: str):
    """The tensor ``FILE[:KEY]`` names (default key ``default_key``)."""
    from adjointdpm.apps.errors import UserInputError

    file, _, key = spec.rpartition(":") if spec.rpartition(":")[0].endswith(".safetensors") else (spec, "", "")
    tensors = read_file(Path(file), flag)
    key = key or default_key
    if key not in tensors:
        raise UserInputError(f"{flag} {file} has no tensor {key!r} (it has {', '.join(sorted(tensors))})")
    return tensors[key]


def embeddings_as_cond(session, tensors: dict, path: Path):
    """The conditioning the engine takes, with the prompt embeddings of a saved file (the pipeline's names) in
    place of the empty prompt's; its ``negative_*`` ones, where present, become the session's negative cond."""
    from adjointdpm.apps import prompt_embeddings
    from adjointdpm.apps.errors import UserInputError

    def fill(template, prefix):
        names = prompt_embeddings.pipeline_tensors(template)  # {pipeline name: template tensor}
        missing = [prefix + k for k in names if prefix + k not in tensors]
        if missing:
            raise UserInputError(f"--embedding {path} lacks {', '.join(missing)} (this model's conditioning)")
        leaves = prompt_embeddings.trainable_view(template)
        values = iter(tensors[prefix + k] for k in names)
        replaced = {id(t): next(values) for t in leaves.values()}
        return _replace(template, replaced, session.device)

    cond = fill(session.encode([""]), "")
    if session.uncond is not None and any(k.startswith("negative_") for k in tensors):
        session.uncond = fill(session.uncond, "negative_")
    return cond


def _replace(tree, replaced: dict, device):
    import torch

    if isinstance(tree, torch.Tensor):
        new = replaced.get(id(tree))
        return tree if new is None else new.to(device, tree.dtype)
    return {k: _replace(v, replaced, device) if isinstance(v, (dict, torch.Tensor)) else v for k, v in tree.items()}


def sample_pipeline_call(session, prompt, embeddings, n: int, lora: str | None = None) -> dict:
    """The pipeline call of a sample: its x_T, and its prompt (one per image) or saved embeddings; ``lora``: a
    LoRA folder the network was given, relative to the output folder."""
    from adjointdpm.apps.pipeline_call import pipeline_call

    tensors = {"latents": "latents.safetensors:latents"}
    if embeddings is None:
        return pipeline_call(session, tensors=tensors, prompts=[prompt] * n, lora=lora)
    from adjointdpm.apps.pipeline_call import EXTRA_FILE, REPEATS_GIVEN_EMBEDDINGS

    given = {k: v for k, v in embeddings.items() if k in EMBEDDING_NAMES}
    rows = int(given["prompt_embeds"].shape[0]) if "prompt_embeds" in given else 1
    if session.comps.family in REPEATS_GIVEN_EMBEDDINGS:  # (the pipeline repeats them per image)
        tensors.update({k: f"embedding.safetensors:{k}" for k in given})
        return pipeline_call(session, tensors=tensors, num_images_per_prompt=max(1, n // rows), lora=lora)
    repeated = {k: (v.expand(n, *v.shape[1:]) if v.shape[0] == 1 else v).contiguous() for k, v in given.items()}
    tensors.update({k: f"{EXTRA_FILE}:{k}" for k in repeated})
    return pipeline_call(session, tensors=tensors, lora=lora, extra_tensors=repeated)


#: the pipeline keywords a saved embedding file may hold
EMBEDDING_NAMES = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds",
                   "prompt_attention_mask", "negative_prompt_attention_mask")


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)
