"""What a run leaves in ``--out`` besides its checkpoint: ``before/`` and ``after/`` (one PNG per image plus
``grid.png``), ``comparison.png`` (before above after), ``loss_curve.png`` and ``summary.json``."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .checkpoint import CHECKPOINT_DIR
from .task import Evaluation

def write_images(ev: Evaluation, folder: Path) -> None:
    from ..images import save_images

    save_images(ev.images, folder, nrow=ev.nrow)


def write_comparison(out: Path, before_metrics: dict, after: Evaluation) -> None:
    """``comparison.png``: the before grid above the after grid (both read back from disk)."""
    import numpy as np
    from PIL import Image

    try:
        top = np.asarray(Image.open(out / "before" / "grid.png"))
        bottom = np.asarray(Image.open(out / "after" / "grid.png"))
    except OSError:
        return
    if top.ndim != bottom.ndim:
        return
    width = max(top.shape[1], bottom.shape[1])

    def pad(a):
        p = np.full((a.shape[0], width) + a.shape[2:], 255, dtype=np.uint8)
        p[:, : a.shape[1]] = a
        return p

    gap = np.full((8, width) + top.shape[2:], 255, dtype=np.uint8)
    Image.fromarray(np.concatenate([pad(top), gap, pad(bottom)])).save(out / "comparison.png")


def finite_losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history if math.isfinite(h["loss"])]


def run_summary(task, cfg, state, iteration, reason, after, files) -> dict:
    losses = finite_losses(state["history"])
    return {
        "task": task.name,
        "settings": state["settings"],
        "seed": cfg.seed,
        "iterations": iteration,
        "stopped_by": reason,
        "budget": cfg.budget,
        "model_calls": {"forward": state["calls_forward"], "backward": state["calls_backward"],
                        "total": state["calls_forward"] + state["calls_backward"]},
        "seconds": round(state["seconds"], 2),
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                 "min": min(losses) if losses else None, "history": state["history"]},
        "skipped_steps": state["skipped"],
        "before": state["before"],
        "after": after,
        **task.summarize(state["before"], after),
        "files": {"before": "before/", "after": "after/", "comparison": "comparison.png",
                  "loss_curve": "loss_curve.png", "checkpoint": f"{CHECKPOINT_DIR}/", **files},
    }


def plot_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    its = [h["iteration"] for h in history if math.isfinite(h["loss"])]
    ax.plot(its, finite_losses(history), marker="o", ms=2.5, lw=1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    calls = history[-1]["calls"] if history else 0
    ax.set_title(f"{title}: loss ({calls} model calls)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
