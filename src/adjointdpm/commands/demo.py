"""``adjointdpm demo``: the main job on the embedded model, end to end, in a few minutes on a CPU.

1. ``sample``: a grid of the embedded model's digits for the in-vocabulary prompts.
2. ``guide``: vocabulary expansion — the model was never taught the word "nine"; the initial noises of
   "a handwritten digit nine" are optimised through the sampler (gradient mode ``--grad``, the exact
   adjoint by default) until the guide classifier sees a nine, and an independent judge scores the
   images before and after.

Both are the ordinary commands with preset arguments; their outputs land in ``--out``.
"""
from __future__ import annotations

from pathlib import Path

import typer

IN_VOCABULARY = ["zero", "one", "two", "three", "four", "five", "six", "seven"]


def demo(
    out: Path = typer.Option(Path("outputs/demo"), "--out", "-o", help="Output folder."),
    grad: str = typer.Option("exact", "--grad", help="Gradient mode of the guidance step."),
    target_class: int = typer.Option(9, "--target-class", help="The held-out digit to teach (8 or 9)."),
    n: int = typer.Option(8, "--n", help="Noises optimised."),
    iters: int = typer.Option(16, "--iters", help="Optimisation iterations."),
    lr: float = typer.Option(0.1, "--lr", help="Step size of the normalised gradient steps on the noise."),
) -> None:
    """Run the main job on the embedded model: sample, then close the vocabulary gap for one digit."""
    from adjointdpm.apps.errors import UserInputError
    from adjointdpm.cli import run

    word = {8: "eight", 9: "nine"}.get(target_class)
    if word is None:
        raise UserInputError(f"--target-class must be a held-out digit of the embedded model (8 or 9), got {target_class}")
    for digit in IN_VOCABULARY[:4]:
        code = run(["sample", "--prompt", f"a handwritten digit {digit}", "--num-images", "8", "--seed", "0",
                    "--out", str(out / "samples" / digit), "--overwrite"])  # (the demo remakes its outputs)
        if code:
            raise typer.Exit(code)
    code = run(["guide", "--out", str(out / f"guide_{word}"), "--overwrite", "--target-class", str(target_class),
                "--prompt", f"a handwritten digit {word}", "--n", str(n), "--iters", str(iters), "--lr", str(lr), "--grad", grad])  # guide's defaults are the recipe of docs/results.md
    if code:
        raise typer.Exit(code)
    typer.echo(f"demo: samples in {out / 'samples'}, vocabulary expansion in {out / f'guide_{word}'} "
               "(before/ and after/ images, comparison.png, loss_curve.png, summary.json)")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
