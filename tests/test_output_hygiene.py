"""What a run leaves on disk: nothing after an argument error, never an earlier run overwritten unasked,
a labelled comparison and a loss curve that names its loss and its direction on integer iterations."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

TINY = ["-n", "2", "--iters", "1", "--steps", "2", "--quiet"]


def cli(args, capsys):
    from adjointdpm.cli import run

    code = run([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, match", [
    (["--steps", "0"], "--steps must be in 1..1000"),
    (["--grad", "adjoin"], "unknown --grad"),
    (["--prompt", "a handwritten digit " * 6], "tokens long"),
    (["--resume"], "no checkpoint"),
    (["--resume", "--overwrite"], "give one of them"),
    (["--height", "12"], "multiple of 8"),
    (["--max-sequence-length", "8"], "T5 text encoder"),
    (["--negative-prompt", "a handwritten digit " * 6], "tokens long"),
])
def test_an_argument_error_leaves_nothing_on_disk(tmp_path, capsys, args, match):
    out = tmp_path / "runs" / "guide"
    code, err = cli(["guide", "--out", out, *TINY, *args], capsys)
    assert code == 2 and match in err, err
    assert not (tmp_path / "runs").exists()


def test_an_earlier_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["guide", "--out", out, *TINY], capsys)[0] == 0
    (out / "stale.txt").write_text("mine")
    first = json.loads((out / "summary.json").read_text())
    code, err = cli(["guide", "--out", out, *TINY, "--seed", "1"], capsys)
    assert code == 2 and "holds an earlier run" in err and "--overwrite" in err
    assert json.loads((out / "summary.json").read_text()) == first  # untouched
    code, err = cli(["guide", "--out", out, *TINY, "--seed", "1", "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["seed"] == 1
    assert (out / "stale.txt").read_text() == "mine"  # (only the run's own outputs are replaced)
    code, err = cli(["guide", "--out", out, *TINY[:2], "--iters", "2", "--steps", "2", "--quiet", "--seed", "1",
                     "--resume"], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["iterations"] == 2


def test_sample_refuses_an_earlier_sample_and_writes_nothing_on_error(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["sample", "-p", "a handwritten digit one", "-n", "2", "--steps", "2", "--out", out]
    assert cli([*args, "--height", "20"], capsys)[0] == 2 and not out.exists()
    assert cli(args, capsys)[0] == 0
    code, err = cli(args, capsys)
    assert code == 2 and "--overwrite" in err
    assert cli([*args, "-n", "1", "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in out.glob("[0-9]*.png")) == ["000.png"]


def test_comparison_is_labelled_with_a_caption_per_image(tmp_path):
    from adjointdpm.apps.outputs import write_comparison, write_images
    from adjointdpm.apps.task import Evaluation

    before = Evaluation(torch.full((3, 3, 16, 16), 0.5), {}, captions=None)
    after = Evaluation(torch.full((3, 3, 16, 16), 0.5), {}, nrow=3, captions=["loss 0.1", "loss 0.2", "loss 0.3"])
    write_images(before, tmp_path / "before")
    write_images(after, tmp_path / "after")
    write_comparison(tmp_path, ["loss 1.0", "loss 2.0", "loss 3.0"], after)
    sheet = np.asarray(Image.open(tmp_path / "comparison.png").convert("L")).astype(int)
    tile = 64  # (16-pixel images zoomed to 64)
    assert sheet.shape[1] == 4 + 3 * (tile + 4)
    dark = sheet < 64  # text is black, the images mid-grey, the page white
    title, first_row = dark[:12], dark[16:16 + tile]
    caption = dark[16 + tile:16 + tile + 12]
    assert title.any() and caption.any() and not first_row.any()
    # the before block, then the after block, each with a title and a caption row
    assert sheet.shape[0] == 2 * (12 + 4 + tile + 12 + 4 + 4)


def test_loss_curve_names_the_loss_its_direction_and_integer_iterations():
    from adjointdpm.apps.outputs import loss_figure

    history = [{"iteration": i, "loss": 1.0 / i, "calls": 10 * i} for i in range(1, 4)]
    fig = loss_figure(history, "guide", "target loss")
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert ax.get_ylabel() == "target loss (lower is better)" and "target loss" in ax.get_title()
