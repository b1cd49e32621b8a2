"""What a run leaves in ``--out`` besides its checkpoint: ``before/`` and ``after/`` (one PNG per image plus
``grid.png``), ``comparison.png`` (before above after, labelled, each image with its metric where the task
gives one), ``loss_curve.png`` (the loss named, its direction, integer iteration ticks), ``summary.json``
(pointing to every file, ``pipeline_call.json`` included) and :func:`prepare_out`, which refuses to write
over an earlier run unless asked to."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .checkpoint import CHECKPOINT_DIR
from .task import Evaluation

def write_images(ev: Evaluation, folder: Path) -> None:
    from ..images import save_images

    save_images(ev.images, folder, nrow=ev.nrow)


def write_comparison(out: Path, before_captions: list[str] | None = None, after: Evaluation | None = None) -> None:
    """``comparison.png``: the before images above the after images (read back from ``before/`` and ``after/``),
    each row of images headed "before" / "after", each image with its caption (its metric) under it."""
    from PIL import Image

    before = _read_pngs(out / "before")
    after_images = _read_pngs(out / "after")
    if not before or not after_images:
        return
    nrow = (after.nrow if after is not None else None) or math.ceil(math.sqrt(len(after_images)))
    panels = [_panel("before", before, before_captions, nrow),
              _panel("after", after_images, after.captions if after is not None else None, nrow)]
    width = max(p.width for p in panels)
    sheet = Image.new("RGB", (width, sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        sheet.paste(p, (0, y))
        y += p.height
    sheet.save(out / "comparison.png")


def _read_pngs(folder: Path) -> list:
    from PIL import Image

    try:
        return [Image.open(f).convert("RGB") for f in sorted(folder.glob("[0-9]*.png"))]
    except OSError:
        return []


def _panel(title: str, images: list, captions: list[str] | None, nrow: int):
    """One labelled block: the title, then the images ``nrow`` per row, zoomed to at least 64 pixels, each
    with its caption under it."""
    from PIL import Image, ImageDraw

    zoom = max(1, 64 // max(images[0].width, images[0].height))
    tile_w, tile_h = images[0].width * zoom, images[0].height * zoom
    line, pad = 12, 4
    caption_h = line if captions else 0
    rows = math.ceil(len(images) / nrow)
    panel = Image.new("RGB", (pad + nrow * (tile_w + pad), line + pad + rows * (tile_h + caption_h + pad) + pad),
                      "white")
    draw = ImageDraw.Draw(panel)
    draw.text((pad, 1), title, fill="black")
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        x, y = pad + c * (tile_w + pad), line + pad + r * (tile_h + caption_h + pad)
        panel.paste(image.resize((tile_w, tile_h), Image.NEAREST), (x, y))
        if captions and i < len(captions):
            draw.text((x, y + tile_h), captions[i], fill="black")
    return panel


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
        "loss_name": getattr(task, "loss_name", "loss"),
    }


def plot_loss(history: list[dict], path: Path, title: str, loss_name: str = "loss") -> None:
    """``loss_curve.png``: :func:`loss_figure`, written atomically."""
    import matplotlib.pyplot as plt

    fig = loss_figure(history, title, loss_name)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def loss_figure(history: list[dict], title: str, loss_name: str = "loss"):
    """The loss per iteration: integer iteration ticks, the loss named and its direction (minimised)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    its = [h["iteration"] for h in history if math.isfinite(h["loss"])]
    ax.plot(its, finite_losses(history), marker="o", ms=2.5, lw=1.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"{loss_name} (lower is better)")
    calls = history[-1]["calls"] if history else 0
    ax.set_title(f"{title}: {loss_name} ({calls} model calls)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


#: what a run writes at the top of ``--out`` (besides the files its task lists in summary.json)
RUN_OUTPUTS = ("before", "after", CHECKPOINT_DIR, "comparison.png", "loss_curve.png", "summary.json",
               "pipeline_call.json", "pipeline_call.safetensors")


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds an earlier run (its summary.json or its checkpoint)."""
    return (out / "summary.json").is_file() or (out / CHECKPOINT_DIR / "checkpoint.json").is_file()


def check_out(out: Path, resume: bool = False, overwrite: bool = False) -> Path:
    """``--out`` checked without creating anything: not a file, an earlier run only with ``--resume`` or
    ``--overwrite``, and writable (the folder, or the nearest folder above it that exists)."""
    from .errors import UserInputError

    out = Path(out).expanduser()
    if resume and overwrite:
        raise UserInputError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"cannot write to --out {out}: it is a file, not a folder")
    if out.is_dir() and holds_run(out) and not (resume or overwrite):
        raise UserInputError(f"--out {out} holds an earlier run: pass --resume to continue it, --overwrite to "
                             "replace it, or choose another --out")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"cannot write to --out {out}: {existing} is not a writable folder")
    return out


def prepare_out(out: Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Create ``--out`` once the run starts; with ``overwrite`` remove the earlier run's outputs first (those
    of :data:`RUN_OUTPUTS` and the files its summary.json lists)."""
    import json
    import shutil

    from .checks import check_writable

    out = check_out(out, resume, overwrite)
    if overwrite and out.is_dir() and holds_run(out):
        names = set(RUN_OUTPUTS)
        try:
            listed = json.loads((out / "summary.json").read_text()).get("files", {}).values()
            names |= {str(v).rstrip("/") for v in listed if v and not Path(str(v)).is_absolute() and ".." not in str(v)}
        except (OSError, ValueError, AttributeError):
            pass
        for name in sorted(names):
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    return check_writable(out)
