"""The applications on flow-matching and dict-conditioned families, end to end through the real CLI: guide,
stylize, invert and audit run on a tiny SD3 folder and a tiny Flux folder (packed latents, distilled guidance)
with a plug-in loss or a classifier, the loss falls, and what they write loads into the family's diffusers
pipeline: the optimised noises as ``latents=`` and the LoRA with ``pipe.load_lora_weights`` give the command's
``after/`` images to within the PNGs' 8-bit rounding (|pipeline − PNG| ≤ 0.6/255, values in [0, 1])."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from _tiny_critics import build_classifier
from _tiny_families import build_tiny_flux, build_tiny_sd3

STEPS = 3
TINY = ["--steps", str(STEPS), "--grad", "exact", "--quiet"]
LOSS = "def bright(images, *, prompts, indices):\n    return (images - 0.8).pow(2).flatten(1).mean(1)\n"
TOL = 0.6 / 255

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def cli(args, capsys):
    from adjointdpm.cli import run

    code = run([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    (root / "loss.py").write_text(LOSS)
    return {"sd3": build_tiny_sd3(root / "sd3"), "flux": build_tiny_flux(root / "flux"),
            "classifier": build_classifier(root / "cls"), "loss": f"{root / 'loss.py'}:bright"}


def _summary(out):
    s = json.loads((out / "summary.json").read_text())
    assert (out / "after" / "grid.png").is_file() and (out / "before" / "grid.png").is_file()
    return s


def _pipeline(family, folder):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from diffusers.utils import logging

    logging.disable_progress_bar()
    if family == "sd3":
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    else:
        pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assert_after_equals(pipe, out, prompt, **kwargs):
    with torch.no_grad():
        images = pipe(prompt=prompt, num_inference_steps=STEPS, output_type="pt", height=16, width=16, **kwargs).images
    files = sorted((out / "after").glob("[0-9]*.png"))[: images.shape[0]]
    png = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2) / 255.0
    assert png.shape == images.shape
    diff = (images.float().clamp(0, 1) - png).abs().max()
    assert diff <= TOL, f"max |pipeline - after/| = {diff * 255:.3f}/255"


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_guide_with_a_loss_writes_the_pipelines_latents(tmp_path, capsys, world, family):
    out = tmp_path / "guide"
    code, err = cli(["guide", "--model", world[family], "--out", out, "-n", "2", "--iters", "3", "--lr", "0.3",
                     "--views", "0", "--prompt", "a photo", "--loss", world["loss"], *TINY], capsys)
    assert code == 0, err
    s = _summary(out)
    assert s["loss"]["min"] < s["loss"]["first"]
    latents = load_file(str(out / "latents.safetensors"))["latents"]
    pipe = _pipeline(family, world[family])
    extra = {"guidance_scale": s["settings"]["guidance_scale"]} if family == "sd3" else {}
    _assert_after_equals(pipe, out, ["a photo"] * 2, latents=latents, **extra)


def test_stylize_lora_on_a_flow_transformer_loads_into_its_pipeline(tmp_path, capsys, world):
    out = tmp_path / "stylize"
    code, err = cli(["stylize", "--model", world["sd3"], "--out", out, "--n-train", "2", "--batch", "2", "--n-eval", "2",
                     "--lora-rank", "2", "--lr", "0.05", "--iters", "3", "--prompt", "a photo", "--loss", world["loss"],
                     *TINY], capsys)
    assert code == 0, err
    s = _summary(out)
    assert s["loss"]["min"] < s["loss"]["first"]
    pipe = _pipeline("sd3", world["sd3"])
    pipe.load_lora_weights(out)
    latents = load_file(str(out / "eval_latents.safetensors"))["latents"]
    _assert_after_equals(pipe, out, ["a photo"] * 2, latents=latents, guidance_scale=s["settings"]["guidance_scale"])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_invert_optimises_the_families_prompt_embeddings(tmp_path, capsys, world, family):
    out = tmp_path / "invert"
    code, err = cli(["invert", "--model", world[family], "--out", out, "--n-train", "2", "--n-heldout", "1",
                     "--iters", "3", "--loss", world["loss"], *TINY], capsys)
    assert code == 0, err
    s = _summary(out)
    assert s["loss"]["min"] < s["loss"]["first"] and s["after"]["embedding_change"] > 0
    saved = load_file(str(out / "embedding.safetensors"))
    assert {"prompt_embeds", "pooled_prompt_embeds"} <= saved.keys()


def test_audit_with_a_classifier_on_a_flow_model(tmp_path, capsys, world):
    out = tmp_path / "audit"
    code, err = cli(["audit", "--model", world["sd3"], "--attack", "classifier", "--classifier", world["classifier"],
                     "--out", out, "-n", "2", "--iters", "2", "--eps", "0.5", "--step-size", "0.3", *TINY], capsys)
    assert code == 0, err
    s = _summary(out)
    assert s["after"]["linf_max"] <= 0.5 + 1e-6
