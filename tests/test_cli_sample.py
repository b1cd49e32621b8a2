"""`adjointdpm sample`: files written, seeding, and one-line errors with a non-zero exit status."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adjointdpm.cli import COMMAND_MODULES, app, register_commands, run

from _tiny_sd import build_tiny_sd


def _images(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("[0-9]*.png"))]


def test_sample_writes_pngs_grid_and_settings(tmp_path):
    out = tmp_path / "a"
    rc = run(["sample", "--prompt", "a handwritten digit seven", "--num-images", "5", "--seed", "0",
              "--out", str(out), "--steps", "8"])
    assert rc == 0
    imgs = _images(out)
    assert [p.name for p in sorted(out.glob("[0-9]*.png"))] == [f"{i:03d}.png" for i in range(5)]
    assert all(im.shape == (16, 16) and im.dtype == np.uint8 for im in imgs)
    assert all(im.std() > 10 for im in imgs)  # not blank
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[0] > 16 and grid.shape[1] > 3 * 16
    meta = json.loads((out / "sample.json").read_text())
    assert meta["prompt"] == "a handwritten digit seven" and meta["steps"] == 8 and meta["solver"] == "dpmpp2m"

    # same seed -> same images (also with another batch size); another seed -> other images
    rc = run(["sample", "-p", "a handwritten digit seven", "-n", "5", "--seed", "0", "-o", str(tmp_path / "b"),
              "--steps", "8", "--batch-size", "2", "--threads", "1"])
    assert rc == 0
    assert all(np.abs(x.astype(int) - y.astype(int)).max() <= 1 for x, y in zip(imgs, _images(tmp_path / "b")))
    run(["sample", "-p", "a handwritten digit seven", "-n", "5", "--seed", "1", "-o", str(tmp_path / "c"), "--steps", "8"])
    assert any(np.abs(x.astype(int) - y.astype(int)).max() > 50 for x, y in zip(imgs, _images(tmp_path / "c")))


@pytest.mark.parametrize("solver", [["--solver", "ddpm"], ["--solver", "ddim", "--eta", "1"]])
def test_sample_with_a_stochastic_solver(tmp_path, solver):
    """Image i injects its own seeded stream: same seed, same images at any batch size; the noise matters
    (η = 1 DDIM differs from η = 0 from the same x_T)."""
    args = ["-p", "a handwritten digit seven", "-n", "3", "--seed", "0", "--steps", "6"]
    assert run(["sample", *args, *solver, "-o", str(tmp_path / "a")]) == 0
    assert run(["sample", *args, *solver, "--batch-size", "1", "-o", str(tmp_path / "b")]) == 0
    assert run(["sample", *args, "--solver", "ddim", "-o", str(tmp_path / "c")]) == 0
    a, b, c = (_images(tmp_path / k) for k in "abc")
    assert len(a) == 3 and all(im.std() > 10 for im in a)
    assert all(np.abs(x.astype(int) - y.astype(int)).max() <= 1 for x, y in zip(a, b))
    assert all(np.abs(x.astype(int) - y.astype(int)).max() > 20 for x, y in zip(a, c))
    meta = json.loads((tmp_path / "a" / "sample.json").read_text())
    assert meta["solver"] == solver[1] and meta["eta"] == (1.0 if "--eta" in solver else 0.0)


def test_sample_with_local_sd_folder(tmp_path):
    sd = build_tiny_sd(tmp_path / "sd")
    rc = run(["sample", "-p", "a small digit", "-n", "2", "-o", str(tmp_path / "out"), "--model", str(sd),
              "--steps", "2", "--solver", "ddim"])
    assert rc == 0
    imgs = _images(tmp_path / "out")
    assert len(imgs) == 2 and imgs[0].shape == (16, 16, 3)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--num-images", "0"], "num-images"),
        (["--steps", "0"], "steps"),
        (["--solver", "euler-maruyama"], "unknown solver"),
        (["--solver", "dpmpp2m", "--eta", "0.5"], "--eta applies to --solver ddim only"),
        (["--solver", "ddim", "--eta", "2"], "--eta must be in [0, 1]"),
        (["--guidance-scale", "-1"], "guidance-scale"),
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--num-images", "abc"], "num-images"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, args, needle):
    rc = run(["sample", "--prompt", "a handwritten digit one", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and err.startswith("adjointdpm: error:") and needle in err
    assert not (tmp_path / "o").exists()


def test_missing_prompt_and_out_file(tmp_path, capsys):
    assert run(["sample", "--out", str(tmp_path / "o")]) == 2
    assert "--prompt" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    assert run(["sample", "-p", "a handwritten digit one", "--out", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_commands_are_registered_from_modules():
    register_commands()
    names = {c.name for c in app.registered_commands}
    assert {"sample", "train"} <= names
    assert {"adjointdpm.commands.sample", "adjointdpm.commands.train"} <= set(COMMAND_MODULES)
    assert len(names) == len(app.registered_commands)  # no command registered twice


def test_console_entry_point_reports_errors_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "adjointdpm.cli", "sample", "-p", "x", "-o", str(tmp_path / "o"),
                           "--model", str(tmp_path / "missing")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("adjointdpm: error:")
    assert len([l for l in proc.stderr.splitlines() if l.strip()]) == 1, proc.stderr
