"""What the applications write loads into the diffusers pipeline and makes the very images the command showed.

A ``StableDiffusionPipeline`` is built from the tiny random SD folder as it is — its own ``PNDMScheduler``
(PLMS, ``skip_prk_steps``), which the commands sample with by default — and called with the command's step count
(``--steps 4``) and guidance 7.5 with the empty negative prompt. Each output is
loaded the way a diffusers user would — optimised and attacked noises as ``latents=``, an inverted embedding as
``prompt_embeds=`` / ``negative_prompt_embeds=``, a LoRA with ``pipe.load_lora_weights(OUT)``, full fine-tuned
weights as a ``unet/`` folder — and the pipeline's images must equal the command's ``after/`` PNGs to within the
8-bit rounding of the PNGs: |pipeline − PNG| ≤ 0.6/255 on every pixel (values in [0, 1]; the PNG is
round(255 v), so 0.5/255 is rounding and 0.1/255 float32 differences between two implementations).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from test_tasks_fixtures import build_tiny_latent_model

RUN = ["--steps", "4", "--grad", "exact", "--quiet", "--guidance-scale", "7.5"]
TOL = 0.6 / 255


def cli(args, capsys):
    from adjointdpm.cli import run

    code = run([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return build_tiny_latent_model(tmp_path_factory.mktemp("sd") / "model")


def _pipeline(folder):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging

    logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kwargs):
    with torch.no_grad():
        return pipe(num_inference_steps=4, guidance_scale=7.5, output_type="pt", height=16, width=16, **kwargs).images


def _pngs(folder, count):
    files = sorted(folder.glob("[0-9]*.png"))[:count]
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2) / 255.0


def _assert_same(images, folder):
    png = _pngs(folder, images.shape[0])
    assert png.shape == images.shape
    diff = (images.float() - png).abs().max()
    assert diff <= TOL, f"max |pipeline - after/| = {diff * 255:.3f}/255"


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def test_guide_noises_are_the_pipelines_latents(tmp_path, capsys, sd):
    out = tmp_path / "guide"
    loss = tmp_path / "loss.py"
    loss.write_text("def bright(images):\n    return (images - 1).pow(2).mean((1, 2, 3))\n")
    code, err = cli(["guide", "--model", sd, "--out", out, "-n", "2", "--iters", "2", "--loss", f"{loss}:bright",
                     "--prompt", "a photo", *RUN], capsys)
    assert code == 0, err
    latents = load_file(str(out / "latents.safetensors"))["latents"]
    _assert_same(_run(_pipeline(sd), prompt=["a photo"] * 2, negative_prompt=[""] * 2, latents=latents), out / "after")
    before = _run(_pipeline(sd), prompt=["a photo"] * 2, negative_prompt=[""] * 2,
                  latents=torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)))
    assert (before - _pngs(out / "after", 2)).abs().max() > 4 * TOL  # (the optimisation did change the images)


def test_attacked_noises_are_the_pipelines_latents(tmp_path, capsys, sd):
    from _tiny_critics import build_classifier

    out = tmp_path / "audit"
    code, err = cli(["audit", "--model", sd, "--out", out, "-n", "2", "--iters", "2", "--eps", "0.5", "--step-size", "0.3",
                     "--classifier", build_classifier(tmp_path / "cls"), "--prompt", "a photo", *RUN], capsys)
    assert code == 0, err
    t = load_file(str(out / "attack.safetensors"))
    assert not torch.equal(t["latents"], t["original_latents"])
    _assert_same(_run(_pipeline(sd), prompt=["a photo"] * 2, negative_prompt=[""] * 2, latents=t["latents"]), out / "after")


def test_inverted_embedding_is_the_pipelines_prompt_embeds(tmp_path, capsys, sd):
    out = tmp_path / "invert"
    code, err = cli(["invert", "--model", sd, "--out", out, "--n-train", "2", "--n-heldout", "0", "--iters", "2", *RUN],
                    capsys)
    assert code == 0, err
    emb = load_file(str(out / "embedding.safetensors"))
    n = emb["latents"].shape[0]
    images = _run(_pipeline(sd), prompt_embeds=emb["prompt_embeds"].expand(n, -1, -1),
                  negative_prompt_embeds=emb["negative_prompt_embeds"].expand(n, -1, -1), latents=emb["latents"])
    _assert_same(images, out / "after")
    initial = _run(_pipeline(sd), prompt_embeds=emb["initial_prompt_embeds"].expand(n, -1, -1),
                   negative_prompt_embeds=emb["negative_prompt_embeds"].expand(n, -1, -1), latents=emb["latents"])
    assert (initial - _pngs(out / "after", n)).abs().max() > 4 * TOL  # (the learned embedding matters)


@pytest.mark.parametrize("rank", [2, 0])
def test_stylize_weights_load_into_the_pipeline(tmp_path, capsys, sd, rank):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "stylize"
    loss = tmp_path / "loss.py"
    loss.write_text("def dark(images, *, prompts, indices):\n    return (images + 1).pow(2).mean((1, 2, 3))\n")
    code, err = cli(["stylize", "--model", sd, "--out", out, "--n-train", "2", "--batch", "2", "--n-eval", "2",
                     "--lora-rank", str(rank), "--lr", "0.01", "--iters", "2", "--prompt", "a photo",
                     "--loss", f"{loss}:dark", *RUN], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["mean_abs_change"] > 1e-3  # the weights did change the images
    latents = load_file(str(out / "eval_latents.safetensors"))["latents"]
    untuned = _run(_pipeline(sd), prompt=["a photo"] * 2, negative_prompt=[""] * 2, latents=latents)
    assert (untuned - _pngs(out / "after", 2)).abs().max() > 4 * TOL  # (without the weights the check fails)
    pipe = _pipeline(sd)
    if rank:
        pipe.load_lora_weights(out)
    else:
        pipe.unet = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True)
    _assert_same(_run(pipe, prompt=["a photo"] * 2, negative_prompt=[""] * 2, latents=latents), out / "after")
