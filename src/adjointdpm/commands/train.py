"""``adjointdpm train``: retrain the embedded digits model and its critics from scratch (seeded).

Same as ``python -m adjointdpm.embedded.train``; see that module for what is trained.
"""
from __future__ import annotations

from pathlib import Path

import typer


def train(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (diffusers layout + critics/)."),
    seed: int = typer.Option(0, "--seed"),
    unet_steps: int = typer.Option(None, "--unet-steps", min=1, help="Optimiser steps of the UNet + text encoder."),
    critic_steps: int = typer.Option(None, "--critic-steps", min=1, help="Optimiser steps of each critic."),
    device: str = typer.Option(None, "--device", help="torch device (default: cuda if available, else cpu)."),
    eval_images: int = typer.Option(64, "--eval-images", min=0, help="Images per prompt in the final check (0: skip)."),
    threads: int = typer.Option(1, "--threads", min=0, help="torch CPU threads (1 reproduces the shipped weights; 0: torch's choice)."),
) -> None:
    """Retrain the embedded model (UNet, text encoder, critics) from scratch."""
    from adjointdpm.cli import CLIError
    from adjointdpm.embedded import train as T

    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    argv = ["--out", str(out), "--seed", str(seed), "--eval-images", str(eval_images), "--threads", str(threads)]
    if unet_steps is not None:
        argv += ["--unet-steps", str(unet_steps)]
    if critic_steps is not None:
        argv += ["--critic-steps", str(critic_steps)]
    if device is not None:
        argv += ["--device", device]
    T.main(argv)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
