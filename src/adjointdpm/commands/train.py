"""``adjointdpm train``: retrain the embedded digits model and its critics from scratch (seeded).

The same training as ``python -m adjointdpm.embedded.train`` (:func:`adjointdpm.embedded.train.train`, whose
defaults apply to the options not given); see that module for what is trained.
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
    import torch

    from adjointdpm.apps.errors import UserInputError
    from adjointdpm.embedded.train import train as train_model

    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a folder")
    if threads > 0:
        torch.set_num_threads(threads)
    given = {"unet_steps": unet_steps, "critic_steps": critic_steps}
    train_model(out, seed=seed, eval_images=eval_images,
                device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                **{k: v for k, v in given.items() if v is not None})


def register(app: typer.Typer) -> None:
    app.command("train")(train)
