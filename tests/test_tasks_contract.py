"""The contract every application keeps, in the style of diffusers' ``SchedulerCommonTest``: one base class,
:class:`ApplicationContract`, whose tests each application's subclass runs through the real command line at
tiny settings on the embedded model —

* it runs and writes its outputs (before/, after/, comparison.png, loss_curve.png, summary.json, the checkpoint
  and its own files, each named in summary.json) and reports one line;
* a run stopped and resumed (``--resume``) ends exactly where an uninterrupted run ends: the same losses, the
  same metrics, the same model calls and the same saved tensors;
* it refuses bad input with one line and exit status 2, before any work.

A new application adds a subclass here: its command, tiny options, its images per grid and its tensor file.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TINY = ["--steps", "3", "--quiet"]


def cli(args: list) -> tuple[int, str, str]:
    """The real ``adjointdpm`` entry point, in-process: (status, stdout, stderr)."""
    from adjointdpm.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


class ApplicationContract:
    """Subclasses set the command, its tiny options, the images in its before/after grids, the safetensors
    file of its result and one application-specific bad input (options, what the error line says)."""

    command: str
    options: list = []
    n_images: int
    tensors: str
    bad_input: tuple[list, str]

    @pytest.fixture(scope="class")
    @classmethod
    def runs(cls, tmp_path_factory):
        """An uninterrupted run of 4 iterations, and one stopped after 2 and resumed to 4."""
        root = tmp_path_factory.mktemp(cls.command)
        full, part = root / "full", root / "part"
        args = [cls.command, *cls.options, *TINY, "--checkpoint-every", "2"]
        results = {"full": cli([*args, "--out", full, "--iters", "4"]),
                   "part": cli([*args, "--out", part, "--iters", "2"]),
                   "resumed": cli([*args, "--out", part, "--iters", "4", "--resume"])}
        for name, (code, _, err) in results.items():
            assert code == 0, (name, err)
        return full, part, results

    def test_runs_and_writes_its_outputs(self, runs):
        full, _, results = runs
        s = _summary(full)
        assert s["task"] == self.command and s["iterations"] >= 1
        for name, path in s["files"].items():
            assert (full / path).exists(), (name, path)
        for f in ("summary.json", "loss_curve.png", "comparison.png", "before/grid.png", "after/grid.png",
                  "checkpoint/checkpoint.json", self.tensors):
            assert (full / f).is_file(), f
        for stage in ("before", "after"):
            assert len(list((full / stage).glob("[0-9]*.png"))) == self.n_images
        assert {"model", "grad", "solver", "steps", "guidance_scale"} <= set(s["settings"])
        assert s["settings"]["steps"] == 3 and s["model_calls"]["total"] > 0
        code, stdout, err = results["full"]
        line = stdout.strip().splitlines()[-1]
        assert line.startswith(f"{self.command}: ") and "model calls" in line and line.endswith(f"wrote {full}")

    def test_resumes_identically(self, runs):
        full, part, _ = runs
        a, b = _summary(full), _summary(part)
        assert [h["loss"] for h in a["loss"]["history"]] == [h["loss"] for h in b["loss"]["history"]]
        assert a["after"] == b["after"] and a["model_calls"] == b["model_calls"]
        ta, tb = load_file(str(full / self.tensors)), load_file(str(part / self.tensors))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    @pytest.mark.parametrize("case", ["iters", "resume", "grad", "own"])
    def test_refuses_bad_input(self, tmp_path, case):
        args, message = {"iters": (["--iters", "-1"], "--iters must be >= 0"),
                         "resume": (["--resume"], "no checkpoint"),
                         "grad": (["--grad", "adjoin"], "unknown --grad"),
                         "own": self.bad_input}[case]
        code, _, err = cli([self.command, *self.options, *TINY, "--out", tmp_path / "out", *args])
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("adjointdpm: error:"), err
        assert message in lines[0] and "Traceback" not in err
        assert not (tmp_path / "out" / "summary.json").exists()


class TestGuide(ApplicationContract):
    command = "guide"
    options = ["--n", "2", "--lr", "0.3"]
    n_images = 2
    tensors = "latents.safetensors"
    bad_input = (["--optimizer", "sgd"], "--optimizer must be adamw or normalized")


class TestAudit(ApplicationContract):
    command = "audit"
    options = ["--n", "4", "--eps", "0.5", "--step-size", "0.3", "--solver", "lcm", "--optimize-noises", "--grad", "exact"]
    n_images = 4
    tensors = "attack.safetensors"
    bad_input = (["--attack", "flip"], "--attack must be classifier or safety")


class TestStylize(ApplicationContract):
    command = "stylize"
    options = ["--n-train", "4", "--batch", "2", "--n-eval", "2", "--lr", "3e-3", "--lora-rank", "2"]
    n_images = 2
    tensors = "pytorch_lora_weights.safetensors"
    bad_input = (["--batch", "8"], "cannot exceed --n-train")


class TestInvert(ApplicationContract):
    command = "invert"
    options = ["--n-train", "2", "--n-heldout", "1", "--lr", "0.05"]
    n_images = 3
    tensors = "embedding.safetensors"
    bad_input = (["--effect", "blur"], "unknown --effect")


class TestFinetune(ApplicationContract):
    command = "finetune"
    # (a constant learning rate: the contract stops a run by a smaller --iters, which a decaying schedule follows;
    # a decaying schedule's resume is tested in tests/test_finetune_app.py)
    options = ["--batch", "2", "--eval-seeds", "2", "--eval-every", "2", "--lora-rank", "2", "--lr-scheduler", "constant"]
    n_images = 20  # the ten digit prompts x 2 evaluation seeds
    tensors = "pytorch_lora_weights.safetensors"
    bad_input = (["--method", "adjoint-matching", "--reward-scale", "0"], "--reward-scale must be a number > 0")


def test_an_application_is_one_module(tmp_path, monkeypatch):
    """The example application of docs/applications.md, as written there, becomes a command with the shared
    options and runs (its loss falls, it reports its line and writes its outputs)."""
    import importlib.util

    import typer
    from typer.testing import CliRunner

    from adjointdpm.commands.applications import application_command

    root = Path(__file__).parents[1]
    path = root / "docs" / "examples" / "brighten_application.py"
    doc = (root / "docs" / "applications.md").read_text().split("## Adding an application")[1]
    shown = doc.split("```python\n")[1].split("```")[0]
    assert shown.strip() and shown in path.read_text()  # the docs show the file this test runs
    spec = importlib.util.spec_from_file_location("brighten_application", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(__import__("sys").modules, spec.name, module)
    spec.loader.exec_module(module)
    app = typer.Typer()
    app.callback()(lambda: None)  # (a group: the command is called by its name, as under adjointdpm)
    app.command("brighten")(application_command(module.APPLICATION))
    out = tmp_path / "brighten"
    result = CliRunner().invoke(app, ["brighten", "--out", str(out), "--brightness", "0.4", "-n", "2", "--lr", "0.02",
                                      "--iters", "3", "--grad", "exact", *TINY])
    assert result.exit_code == 0, result.output
    s = _summary(out)
    assert s["task"] == "brighten" and s["settings"]["brightness"] == 0.4 and s["settings"]["grad"] == "exact"
    assert s["loss"]["last"] < s["loss"]["first"] and s["after"]["distance"] < s["before"]["distance"]
    assert result.output.strip().splitlines()[-1].startswith("brighten: 3 iterations")
    assert (out / "after" / "grid.png").is_file() and (out / "checkpoint" / "checkpoint.json").is_file()
