"""The application commands end to end, at tiny settings: on the embedded model (the default), on a tiny
random-weight Stable Diffusion folder (``--model``: VAE decoding and the CLIP text encoder on that path),
resume == uninterrupted, and bad input → one line, exit status ≠ 0, no traceback (unless --debug)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adjointdpm as adpm
from safetensors.torch import load_file

from test_tasks_fixtures import build_tiny_latent_model

TINY = ["--steps", "3", "--quiet"]
# The loss-falls checks use the exact gradient: at a handful of steps the continuous adjoint is measurably
# biased (docs/results.md, gradient check); the default mode runs at the default steps in its own test.
EXACT = ["--steps", "5", "--grad", "exact", "--quiet"]


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the real ``adjointdpm`` entry point in-process; return (status, stdout, stderr)."""
    from adjointdpm.cli import run

    code = run([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    return build_tiny_latent_model(tmp_path_factory.mktemp("latent"))


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _check_outputs(out: Path, n_images: int) -> dict:
    for f in ("summary.json", "loss_curve.png", "comparison.png", "before/grid.png", "after/grid.png"):
        assert (out / f).is_file(), f
    assert len(list((out / "after").glob("[0-9]*.png"))) == n_images
    assert len(list((out / "before").glob("[0-9]*.png"))) == n_images
    assert (out / "checkpoint" / "checkpoint.json").is_file()
    return _summary(out)


def test_guide(tmp_path, capsys):
    out = tmp_path / "guide"
    code, stdout, err = cli(["guide", "--out", out, "--target-class", "8", "--n", "4", "--iters", "3", "--lr", "0.2",
                             *EXACT], capsys)
    assert code == 0, err
    s = _check_outputs(out, 4)
    assert s["loss"]["last"] < s["loss"]["first"]
    for k in ("judge_accuracy", "frechet_to_class", "frechet_floor_real", "guide_accuracy"):
        assert k in s["before"] and k in s["after"]
    assert s["settings"]["prompt"] == "a handwritten digit eight" and s["settings"]["grad"] == "exact"
    assert "judge_accuracy" in stdout and "model calls" in stdout


def test_guide_default_mode_at_default_steps(tmp_path, capsys):
    """The exact adjoint (the default --grad) with the embedded model's own sampler settings (dpmpp2m, 20 steps)."""
    out = tmp_path / "guide"
    code, _, err = cli(["guide", "--out", out, "--n", "2", "--iters", "2", "--lr", "0.2", "--quiet"], capsys)
    assert code == 0, err
    s = _summary(out)
    assert (s["settings"]["grad"], s["settings"]["steps"], s["settings"]["solver"]) == ("exact", 20, "dpmpp2m")
    assert s["loss"]["last"] < s["loss"]["first"]
    # 2 x (20 record + 20 recompute, 20 backward) + 2 x 3 re-noised denoiser calls of the manifold prior (and their backward)
    assert s["model_calls"] == {"forward": 86, "backward": 46, "total": 132}


def test_audit_classifier_and_safety(tmp_path, capsys):
    out = tmp_path / "audit"
    code, _, err = cli(["audit", "--out", out, "--n", "6", "--iters", "3", "--eps", "0.5", "--step-size", "0.3", *EXACT], capsys)
    assert code == 0, err
    s = _check_outputs(out, 6)
    assert s["after"]["n_attacked"] >= 1 and s["after"]["linf_max"] <= 0.5 + 1e-6
    assert s["before"]["success_rate"] == 0.0
    assert s["after"]["success_rate"] > 0 or s["loss"]["last"] < s["loss"]["first"]
    out2 = tmp_path / "safety"
    code, _, err = cli(["audit", "--attack", "safety", "--out", out2, "--n", "8", "--iters", "2", "--steps", "5",
                        "--guidance-scale", "1", "--quiet"], capsys)
    assert code == 0, err
    s2 = _summary(out2)
    assert {"success_rate", "flag_rate", "judge_keeps_label"} <= set(s2["after"])


@pytest.mark.parametrize("lora,lr", [(0, 1e-4), (2, 1e-3)])
def test_stylize(tmp_path, capsys, lora, lr):
    out = tmp_path / "stylize"
    code, _, err = cli(["stylize", "--out", out, "--lora-rank", lora, "--n-train", "4", "--batch", "4", "--n-eval", "4",
                        "--iters", "3", "--lr", lr, *EXACT], capsys)
    assert code == 0, err
    s = _check_outputs(out, 4)
    assert s["loss"]["last"] < s["loss"]["first"]
    assert s["after"]["style_loss"] < s["before"]["style_loss"]
    assert "judge_accuracy" in s["after"] and "judge_accuracy_kept" in s
    if lora:
        weights = load_file(str(out / s["files"]["lora"]))  # diffusers' LoRA format: unet.….lora_A/B.weight
        assert weights and all(k.startswith("unet.") and "lora" in k for k in weights)
    else:
        weights = load_file(str(out / s["files"]["unet"] / "diffusion_pytorch_model.safetensors"))
        assert weights and not any("lora" in k for k in weights)


@pytest.mark.parametrize("command, extra", [
    ("stylize", ["--lora-rank", "2", "--n-train", "4", "--batch", "2", "--n-eval", "2", "--lr", "1e-3"]),
    ("invert", ["--n-train", "3", "--n-heldout", "2", "--lr", "0.05"]),
])
def test_stylize_and_invert_with_a_stochastic_solver(tmp_path, capsys, command, extra):
    """Each training sample injects its own stream at every iteration, the one its target was made with."""
    out = tmp_path / command
    code, _, err = cli([command, "--out", out, *extra, "--iters", "3", "--solver", "dpmpp2m_sde", *EXACT], capsys)
    assert code == 0, err
    s = _summary(out)
    assert s["settings"]["solver"] == "dpmpp2m_sde" and s["loss"]["min"] < s["loss"]["first"]


def test_invert(tmp_path, capsys):
    out = tmp_path / "invert"
    code, _, err = cli(["invert", "--out", out, "--n-train", "3", "--n-heldout", "2", "--iters", "3", "--lr", "0.05", *EXACT], capsys)
    assert code == 0, err
    s = _check_outputs(out, 5)
    assert s["loss"]["last"] < s["loss"]["first"]
    assert s["after"]["psnr_train"] > s["before"]["psnr_train"]
    assert "psnr_heldout" in s["after"]
    emb = load_file(str(out / "embedding.safetensors"))
    assert emb["prompt_embeds"].shape == emb["initial_prompt_embeds"].shape
    assert not torch.equal(emb["prompt_embeds"], emb["initial_prompt_embeds"])
    assert len(list((out / "targets").glob("[0-9]*.png"))) == 5


@pytest.mark.parametrize("command,extra", [
    ("guide", ["--n", "2", "--lr", "0.3", "--solver", "ddpm", "--optimize-noises", "--grad", "exact"]),
])
def test_resume_equals_uninterrupted(tmp_path, capsys, command, extra):
    """(Every application's plain resume, audit's with optimised noises among them, is its contract's:
    tests/test_tasks_contract.py.)"""
    full, part = tmp_path / "full", tmp_path / "part"
    args = [command, *extra, *TINY, "--checkpoint-every", "2"]
    assert cli([*args, "--out", full, "--iters", "4"], capsys)[0] == 0
    assert cli([*args, "--out", part, "--iters", "2"], capsys)[0] == 0
    assert cli([*args, "--out", part, "--iters", "4", "--resume"], capsys)[0] == 0
    a, b = _summary(full), _summary(part)
    assert [h["loss"] for h in a["loss"]["history"]] == [h["loss"] for h in b["loss"]["history"]]
    assert a["after"] == b["after"] and a["model_calls"] == b["model_calls"]
    name = {"guide": "latents.safetensors", "audit": "attack.safetensors"}.get(command, "pytorch_lora_weights.safetensors")
    ta, tb = load_file(str(full / name)), load_file(str(part / name))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("command,extra", [
    ("guide", ["--n", "2"]),
    ("audit", ["--n", "32"]),  # 6 of them attackable on this random model (the guide and the judge agree)
    ("stylize", ["--n-train", "2", "--batch", "2", "--n-eval", "2", "--lora-rank", "2", "--reference", "skimage:brick"]),
    ("invert", ["--n-train", "2", "--n-heldout", "1"]),
])
def test_local_stable_diffusion_folder(tmp_path, capsys, latent, command, extra):
    """The digits critics on another model only when asked for (--critics); tests/test_tasks_critics.py runs
    the critics a Stable Diffusion user brings."""
    from adjointdpm.components import EMBEDDED_MODEL

    out = tmp_path / command
    code, _, err = cli([command, "--model", latent, "--out", out, "--iters", "2", "--critics", EMBEDDED_MODEL / "critics",
                        *extra, *TINY], capsys)
    assert code == 0, err
    s = _summary(out)
    assert s["settings"]["model"] == str(latent) and s["iterations"] >= 1
    if command == "audit":  # the fixed random model and seed give samples to attack (audit needs at least one)
        assert s["after"]["n_attacked"] >= 3, s["after"]
    from PIL import Image

    img = Image.open(out / "after" / "000.png")
    assert img.mode == "RGB" and img.size == (16, 16)  # decoded by the VAE: 3 channels, 2x the latent size


def _invalid_model_folders(root: Path) -> dict[str, Path]:
    """Existing folders that are not diffusers pipelines, each with what its error names."""
    folders = {"has no model_index.json": root / "empty", "has no unet/ folder": root / "no_unet",
               "is not valid JSON": root / "bad_index",
               "unet has no diffusion_pytorch_model.safetensors": root / "empty_unet"}
    for folder in folders.values():
        folder.mkdir()
    index = {"_class_name": "StableDiffusionPipeline", **{c: ["diffusers", "X"] for c in
                                                          ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}}
    for name in ("no_unet", "empty_unet"):
        (root / name / "model_index.json").write_text(json.dumps(index))
    (root / "empty_unet" / "unet").mkdir()
    (root / "bad_index" / "model_index.json").write_text("{not json")
    return folders


def test_bad_inputs_are_one_line(tmp_path, capsys, latent):
    from PIL import Image

    from adjointdpm.components import EMBEDDED_MODEL

    blocker = tmp_path / "file"
    blocker.write_text("x")
    Image.new("L", (20, 20)).save(tmp_path / "big.png")
    Image.new("CMYK", (16, 16)).save(tmp_path / "cmyk.jpg")
    Image.new("I;16", (16, 16)).save(tmp_path / "deep.png")
    (tmp_path / "text.png").write_text("not an image")
    targets = tmp_path / "targets"
    targets.mkdir()
    Image.new("L", (8, 8)).save(targets / "0.png")
    long_prompt = "a handwritten digit " * 6
    invalid = _invalid_model_folders(tmp_path)
    model_cases = [([command, "--model", folder, "--out", tmp_path / f"{command}{i}", *more], match)
                   for i, (match, folder) in enumerate(invalid.items())
                   for command, more in (("guide", []), ("sample", ["--prompt", "x"]))]
    cases = model_cases + [
        (["guide", "--model", blocker, "--out", tmp_path / "o10"], "is not a folder"),
        (["guide", "--out", blocker], "cannot write to --out"),
        (["guide", "--out", tmp_path / "o11", "--steps", "0"], "--steps must be in 1..1000"),
        (["guide", "--out", tmp_path / "o12", "--critics", tmp_path / "empty"], "has no critics/"),
        (["stylize", "--out", tmp_path / "o13", "--prompt", long_prompt], "tokens long"),
        (["stylize", "--out", tmp_path / "o14", "--reference", tmp_path / "text.png"], "not a readable image"),
        (["invert", "--out", tmp_path / "o15", "--targets", tmp_path / "deep.png"], "mode I;16"),
        (["sample", "--out", tmp_path / "o16", "--prompt", long_prompt], "tokens long"),
        (["sample", "--out", blocker / "sub", "--prompt", "x"], "cannot write to --out"),
        (["sample", "--model", tmp_path / "missing", "--out", tmp_path / "o17", "--prompt", "x"], "does not exist"),
        (["guide", "--model", tmp_path / "missing", "--out", tmp_path / "o1"], "does not exist"),
        (["guide", "--out", blocker / "sub"], "cannot write to --out"),
        (["guide", "--out", tmp_path / "o2", "--prompt", "a handwritten digit " * 6], "tokens long"),
        (["stylize", "--out", tmp_path / "o4", "--reference", tmp_path / "cmyk.jpg"], "mode CMYK"),
        (["stylize", "--out", tmp_path / "o5", "--reference", tmp_path / "nope.png"], "does not exist"),
        (["guide", "--out", tmp_path / "o6", "--grad", "adjoin"], "unknown --grad"),
        (["guide", "--out", tmp_path / "o7", "--resume"], "no checkpoint"),
        (["guide", "--model", latent, "--out", tmp_path / "o8", "--prompt", "a handwritten digit " * 4,
          "--critics", EMBEDDED_MODEL / "critics"], "at most 12"),
    ]
    for args, match in cases:
        code, _, err = cli([*args] + (["--quiet"] if args[0] != "sample" else []), capsys)
        lines = err.strip().splitlines()
        assert code == 2, (args, err)
        assert len(lines) == 1, (args, err)
        assert "Traceback" not in err and match in lines[-1] and lines[-1].startswith("adjointdpm: error:"), (args, err)
    assert not (tmp_path / "o16").exists() and not (tmp_path / "sample0").exists()  # sample: nothing written
    with pytest.raises(Exception):
        cli(["guide", "--model", tmp_path / "missing", "--out", tmp_path / "o9", "--debug"], capsys)
    with pytest.raises(Exception):
        cli(["sample", "--model", tmp_path / "empty", "--out", tmp_path / "o9", "--prompt", "x", "--debug"], capsys)


def test_memory_budget_keeps_the_exact_gradient(tmp_path, capsys):
    """--memory-budget inf keeps every step's graph: the same run, loss for loss, as the default exact mode, in
    fewer model calls."""
    runs = {}
    for name, extra in (("flat", []), ("kept", ["--memory-budget", "inf"])):
        out = tmp_path / name
        code, _, err = cli(["guide", "--out", out, "--target-class", "3", "--n", "2", "--iters", "2", *EXACT, *extra],
                           capsys)
        assert code == 0, err
        runs[name] = _summary(out)
    assert runs["kept"]["settings"]["grad"] == "exact(memory=inf)"
    losses = {k: [h["loss"] for h in r["loss"]["history"]] for k, r in runs.items()}
    calls = {k: r["loss"]["history"][-1]["calls"] for k, r in runs.items()}
    assert losses["kept"] == pytest.approx(losses["flat"], rel=1e-5)
    assert calls["kept"] < calls["flat"]  # the kept graphs are replayed, not recomputed
    code, _, err = cli(["guide", "--out", tmp_path / "bad", "--grad", "adjoint", "--memory-budget", "1GiB", *TINY], capsys)
    assert code == 2 and "--memory-budget applies to --grad exact" in err and err.count("\n") == 1


def _after_images(out: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    pngs = sorted((out / "after").glob("[0-9]*.png"))
    return torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("L"), dtype=np.float32)) / 255 for f in pngs])


def _resampled(saved: dict, settings: dict, solver: str, prompt: str, latents: str = "latents") -> torch.Tensor:
    """The images adpm.sample gives from a command's saved x_T and injected noises, in [0, 1]."""
    from adjointdpm.apps.options import EngineOptions
    from adjointdpm.apps.session import Session

    session = Session(EngineOptions(grad="exact", solver=solver, steps=settings["steps"],
                                    guidance_scale=settings["guidance_scale"]))
    with torch.no_grad():
        images = session.generate(saved[latents], session.encode([prompt]), noise=saved["noises"])
    return (images[:, 0].clamp(-1, 1) + 1) / 2


@pytest.mark.parametrize("optimize_noises", [True, False])
def test_guide_with_a_stochastic_sampler_saves_what_resamples_its_images(tmp_path, capsys, optimize_noises):
    """--solver ddpm: x_T (and with --optimize-noises every step's injected noise, kept best with x_T) are
    optimised, the loss falls, and the saved (latents, noises) re-sample the after/ images through adpm.sample;
    unoptimised, the noises are each sample's seeded stream, which --optimize-noises starts from."""
    from adjointdpm.apps.options import EngineOptions
    from adjointdpm.apps.session import Session

    out = tmp_path / "noises"
    flag = ["--optimize-noises"] if optimize_noises else []
    code, _, err = cli(["guide", "--out", out, "--target-class", "4", "--n", "3", "--iters", "3", "--lr", "0.2",
                        "--stop-loss", "0", "--manifold-weight", "0", "--manifold-threshold", "0", "--solver", "ddpm",
                        *flag, *EXACT], capsys)
    # (no manifold prior or check: the loss is the critic's and keep-best its lowest; this test is about the noises)
    assert code == 0, err
    s = _summary(out)
    assert s["loss"]["min"] < s["loss"]["first"] and s["settings"]["optimize_noises"] == optimize_noises
    saved = load_file(str(out / "latents.safetensors"))
    assert saved["noises"].shape == (5, 3, *saved["latents"].shape[1:])
    again = _resampled(saved, s["settings"], "ddpm", s["settings"]["prompt"])
    assert (again - _after_images(out)).abs().max() <= 0.6 / 255
    session = Session(EngineOptions(grad="exact", solver="ddpm", steps=5))
    streams = adpm.noise_tensor(session.noise_streams(range(3), 0).seed, 5, saved["latents"])  # (--seed 0)
    moved = (saved["noises"] - streams).flatten(2).abs().amax(2)  # (steps, samples)
    if optimize_noises:
        assert bool((moved[:-1] > 0).all())  # (the last DDPM step injects nothing: its noise gets no gradient)
    else:
        assert moved.max() == 0


def test_eta_makes_ddim_stochastic_in_the_commands(tmp_path, capsys):
    """--solver ddim --eta 1 injects noise (and so takes --optimize-noises); --eta on another solver, or out of
    [0, 1], is one line."""
    out = tmp_path / "eta"
    code, _, err = cli(["audit", "--out", out, "--n", "4", "--iters", "2", "--eps", "0.5", "--step-size", "0.3",
                        "--solver", "ddim", "--eta", "1", "--optimize-noises", *EXACT], capsys)
    assert code == 0, err
    s = _summary(out)
    assert s["settings"]["eta"] == 1.0 and s["settings"]["optimize_noises"]
    saved = load_file(str(out / "attack.safetensors"))
    assert saved["noises"].shape == (5, 4, *saved["latents"].shape[1:])
    assert (saved["noises"] - saved["original_noises"]).abs().max() <= 0.5 + 1e-6
    for args, message in ((["--solver", "dpmpp2m", "--eta", "0.5"], "--eta: eta applies to solver='ddim' only"),
                          (["--solver", "ddim", "--eta", "1.5"], "eta must lie in [0, 1]")):
        code, _, err = cli(["guide", "--out", tmp_path / "bad", *args, *TINY], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_noise_optimisation_is_refused_where_it_cannot_apply(tmp_path, capsys):
    for command in ("guide", "audit"):
        code, _, err = cli([command, "--out", tmp_path / f"bad-{command}", "--optimize-noises", *TINY], capsys)
        assert code == 2 and "needs a stochastic --solver" in err
    code, _, err = cli(["guide", "--out", tmp_path / "bad2", "--solver", "ddpm", "--grad", "adjoint", *TINY], capsys)
    assert code == 2 and "injects noise" in err
