"""Every application's ``pipeline_call.json`` replayed by its diffusers pipeline gives the run's ``after/`` images.

Each run here goes through the real CLI on a tiny folder (the embedded digits model, an SD 1.x folder that
ships ``PNDMScheduler``, and the SDXL, SD3, Flux and PixArt layouts of ``_tiny_families``), then
``adjointdpm.apps.pipeline_call.replay`` does what a diffusers user would — ``from_pretrained`` on the model
folder, the recorded scheduler, ``load_lora_weights``, the tensors, the recorded keywords — and the images
must equal ``after/``'s PNGs after the same 8-bit rounding: |round(255 · replay) − PNG| ≤ 1 on every pixel
(one rounding step: float32 differences between two implementations can cross a rounding boundary).
A call that cannot be exact (a stochastic solver, model times between integers) says so.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny_critics import build_classifier
from _tiny_families import BUILDERS
from test_tasks_fixtures import build_tiny_latent_model

LOSS = "def bright(images, *, prompts, indices):\n    return (images - 0.8).pow(2).flatten(1).mean(1)\n"
STEPS = ["--steps", "4", "--grad", "exact", "--quiet"]  # (4 steps: the uniform grid 999, 666, 333, 0 is integral)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


def cli(args, capsys):
    from adjointdpm.cli import run

    code = run([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from diffusers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("replay")
    (root / "loss.py").write_text(LOSS)
    (root / "reward.py").write_text("def dark(images, **_):\n    return -images.mean((1, 2, 3))\n")
    (root / "prompts.txt").write_text("a photo\na cat\n")
    return {"root": root, "loss": f"{root / 'loss.py'}:bright", "classifier": build_classifier(root / "cls"),
            "reward": f"{root / 'reward.py'}:dark", "prompts": str(root / "prompts.txt"),
            "sd": build_tiny_latent_model(root / "sd")}


def model_folder(world, family):
    if family not in world:
        world[family] = BUILDERS[family](world["root"] / family)
    return world[family]


def pngs(folder) -> torch.Tensor:
    files = sorted(folder.glob("[0-9]*.png"))
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)


def assert_replays(out, exact: bool = True) -> dict:
    from adjointdpm.apps.pipeline_call import replay

    call = json.loads((out / "pipeline_call.json").read_text())
    assert json.loads((out / "summary.json").read_text())["files"]["pipeline_call"] == "pipeline_call.json"
    assert call["exact"] is exact, call["notes"]
    images = (replay(out) * 255).round()
    if images.shape[1] == 1:  # (a grayscale model: its PNGs read back as RGB)
        images = images.expand(-1, 3, -1, -1)
    after = pngs(out / "after").float()
    assert images.shape == after.shape, (images.shape, after.shape)
    diff = float((images - after).abs().max())
    if exact:
        assert diff <= 1, f"max |replay - after/| = {diff}/255"
    return call


def app_args(app, world, family):
    """Tiny options of ``app`` on ``family`` (the embedded model: its own critics and recipe)."""
    embedded = family == "embedded"
    critic = [] if embedded else ["--loss", world["loss"]]
    return {
        "guide": ["-n", "2", "--iters", "2", "--views", "0", "--lr", "0.3", *critic,
                  *(["--prompt", "a photo"] if not embedded else [])],
        "audit": ["-n", "2", "--iters", "2", "--eps", "0.5", "--step-size", "0.3",
                  *([] if embedded else ["--classifier", world["classifier"], "--prompt", "a photo"])],
        "stylize": ["--n-train", "2", "--batch", "2", "--n-eval", "2", "--lr", "0.05", "--iters", "1",
                    "--lora-rank", "0" if family == "pixart" else "2",
                    *([] if embedded else ["--prompt", "a photo", *critic])],
        "invert": ["--n-train", "2", "--n-heldout", "1", "--iters", "2", *critic],
        "finetune": ["--iters", "1", "--batch", "2", "--eval-seeds", "1", "--method", "truncated:k=1",
                     *([] if embedded else ["--reward", world["reward"], "--prompts", world["prompts"]])],
    }[app]


def run_app(app, family, world, capsys, tmp_path, *extra):
    model = [] if family == "embedded" else ["--model", model_folder(world, family)]
    out = tmp_path / f"{app}-{family}"
    code, err = cli([app, *model, "--out", out, *app_args(app, world, family), *STEPS, *extra], capsys)
    assert code == 0, err
    return out


CASES = ([(app, "embedded") for app in ("guide", "audit", "stylize", "invert", "finetune")]
         + [(app, "sd") for app in ("guide", "audit", "stylize", "invert", "finetune")]
         + [("guide", f) for f in ("sdxl", "sd3", "flux", "pixart")]
         + [("invert", f) for f in ("sdxl", "sd3", "flux", "pixart")]
         + [("stylize", "flux"), ("stylize", "pixart"), ("audit", "sd3")])


@pytest.mark.parametrize("app, family", CASES, ids=[f"{a}-{f}" for a, f in CASES])
def test_pipeline_call_replays_after(tmp_path, capsys, world, app, family):
    call = assert_replays(run_app(app, family, world, capsys, tmp_path))
    assert call["pipeline"] == ("StableDiffusionPipeline" if family in ("embedded", "sd") else
                                json.loads((model_folder(world, family) / "model_index.json").read_text())["_class_name"])
    kwargs = call["kwargs"]
    assert kwargs["height"] == kwargs["width"] == 16
    if family == "embedded":  # the model's own recipe: the uniform grid with the solver's scheduler twin
        assert call["scheduler"]["class"] == "DPMSolverMultistepScheduler"
        assert call["scheduler"]["config"]["final_sigmas_type"] == "zero"
        assert kwargs["timesteps"] == [999, 666, 333, 0]
    else:  # the folder's own scheduler and grid
        assert call["scheduler"] is None and kwargs["num_inference_steps"] == 4
    if family in ("flux", "sd3", "pixart"):
        assert kwargs["max_sequence_length"] > 0
    assert (call["lora"] == ".") == (app in ("stylize", "finetune") and family != "pixart")


def test_size_negative_prompt_and_solver_twins_replay(tmp_path, capsys, world):
    """--height/--width change the latent grid, --negative-prompt the negative cond; on a model with its own
    uniform-grid recipe --solver ddim / heun record their scheduler twins (Euler, Heun): the replay follows each."""
    out = run_app("guide", "sd", world, capsys, tmp_path, "--height", "24", "--width", "16",
                  "--negative-prompt", "a blurry photo", "--guidance-scale", "5")
    call = assert_replays(out)
    assert (call["kwargs"]["height"], call["kwargs"]["width"]) == (24, 16)
    assert call["kwargs"]["negative_prompt"] == ["a blurry photo"] * 2
    assert call["scheduler"] is None  # the folder's own
    assert pngs(out / "after").shape[-2:] == (24, 16)
    euler = run_app("invert", "embedded", world, capsys, tmp_path / "euler", "--solver", "ddim")
    assert assert_replays(euler)["scheduler"]["class"] == "EulerDiscreteScheduler"
    heun = run_app("invert", "embedded", world, capsys, tmp_path / "heun", "--solver", "heun")
    assert assert_replays(heun)["scheduler"]["class"] == "HeunDiscreteScheduler"


def test_flux_records_its_sequence_length_and_guidance(tmp_path, capsys, world):
    out = run_app("guide", "flux", world, capsys, tmp_path, "--max-sequence-length", "16", "--height", "32",
                  "--guidance-scale", "2.5")
    call = assert_replays(out)
    assert call["kwargs"]["max_sequence_length"] == 16 and call["kwargs"]["height"] == 32
    assert call["kwargs"]["guidance_scale"] == 2.5


def test_calls_that_cannot_be_exact_say_why(tmp_path, capsys, world):
    stochastic = run_app("guide", "embedded", world, capsys, tmp_path / "a", "--solver", "ddpm")
    call = json.loads((stochastic / "pipeline_call.json").read_text())
    assert call["exact"] is False and "injects noise" in call["notes"][0]
    assert call["scheduler"]["class"] == "DDPMScheduler"
    between = run_app("invert", "embedded", world, capsys, tmp_path / "b", "--steps", "3")
    call = json.loads((between / "pipeline_call.json").read_text())
    assert call["exact"] is False and "between integers" in " ".join(call["notes"])


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_sample_looks_at_a_runs_latents_and_embedding(tmp_path, capsys, world, family):
    """``sample --latents --embedding`` remakes invert's after/ without Python, and writes its own call."""
    out = run_app("invert", family, world, capsys, tmp_path)
    settings = json.loads((out / "summary.json").read_text())["settings"]
    look = tmp_path / "look"
    code, err = cli(["sample", "--model", model_folder(world, family), "--embedding", out / "embedding.safetensors",
                     "--latents", f"{out / 'embedding.safetensors'}:latents", "--steps", "4",
                     "--guidance-scale", settings["guidance_scale"], "--out", look], capsys)
    assert code == 0, err
    assert torch.equal(pngs(look), pngs(out / "after"))
    from adjointdpm.apps.pipeline_call import replay

    assert float(((replay(look) * 255).round() - pngs(look).float()).abs().max()) <= 1
