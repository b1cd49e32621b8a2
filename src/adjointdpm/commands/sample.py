"""``adjointdpm sample``: text-to-image generation with the embedded model or a local diffusers folder.

``--model`` opens an SD 1.x/2.x, SDXL, SD3/3.5, Flux or PixArt-alpha/Sigma pipeline folder (safetensors,
offline); steps, solver and guidance scale default to the model's (the solver that reproduces the
folder's scheduler).

Writes one PNG per image (``000.png`` ...), ``grid.png`` and ``sample.json`` (the settings used)
into ``--out``. Initial noise x_T is drawn from a CPU generator seeded with ``--seed``. ``--lora DIR`` loads
fine-tuned weights first (a ``finetune`` or ``stylize`` run's output: its LoRA or its ``unet/`` folder).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def sample(
    prompt: str = typer.Option(..., "--prompt", "-p", help='Text prompt, e.g. "a handwritten digit seven".'),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created)."),
    num_images: int = typer.Option(16, "--num-images", "-n", min=1, max=4096, help="Number of images."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial noise."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, max=1000, help="Solver steps (default: the model's; 20 for the embedded model)."),
    solver: Optional[str] = typer.Option(None, "--solver", help="ODE solver: ddim (Euler; FlowMatchEuler's step on flow models), dpmpp2m or heun (default: the model's); stochastic: ddpm, euler_ancestral, dpmpp2m_sde, lcm, or ddim with --eta > 0 (image i's injected noises from its own stream of --seed)."),
    eta: float = typer.Option(0.0, "--eta", help="DDIM's eta in [0, 1] (--solver ddim only): 0 deterministic, 1 DDPM's posterior noise."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", "-g", help="Classifier-free guidance scale (default: the model's; guidance-distilled Flux: the guidance it is given)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Local diffusers folder: SD 1.x/2.x, SDXL, SD3/3.5, Flux or PixArt (default: the embedded digits model)."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="Sample with fine-tuned weights: the --out folder of a finetune or stylize run (its pytorch_lora_weights.safetensors, or its unet/ folder)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per network batch."),
    device: str = typer.Option("cpu", "--device", help='torch device, e.g. "cpu" or "cuda".'),
    threads: int = typer.Option(0, "--threads", min=0, help="torch CPU threads (0: torch's choice; 1 is best on a busy machine)."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors."),
) -> None:
    """Generate images from a text prompt."""
    del debug  # (acted on by adjointdpm.cli.run, around every command)
    import torch

    import adjointdpm as adpm
    from adjointdpm.apps.checks import check_prompt_length, check_writable, parse_device
    from adjointdpm.apps.errors import UserInputError
    from adjointdpm.components import load_components
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
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a folder")
    dev = parse_device(device)

    if threads:
        torch.set_num_threads(threads)
    if lora is not None and not lora.expanduser().is_dir():
        raise UserInputError(f"--lora {lora} is not a folder (give the --out folder of a finetune or stylize run)")
    comps = load_components(model, device=dev)
    if lora is not None:
        from adjointdpm.apps.weights import load_weights

        load_weights(comps, lora)
    check_prompt_length(comps.prompt_tokenizer, prompt)  # (longer prompts would be cut silently)
    out = check_writable(out)  # before the work, not after it
    images = comps.generate([prompt] * num_images, seed=seed, steps=steps, solver=solver, eta=eta,
                            guidance_scale=guidance_scale, batch_size=batch_size)
    files, grid = save_images(images, out)
    settings = comps.settings
    meta = {
        "prompt": prompt, "num_images": num_images, "seed": seed,
        "steps": steps or settings["default_steps"], "solver": solver or settings["default_solver"], "eta": eta,
        "guidance_scale": settings["default_guidance_scale"] if guidance_scale is None else guidance_scale,
        "model": str(comps.path), "lora": None if lora is None else str(lora), "files": [f.name for f in files], "grid": grid.name,
    }
    (out / "sample.json").write_text(json.dumps(meta, indent=2) + "\n")
    typer.echo(f"wrote {len(files)} images and {grid.name} to {out}")


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)
