"""The applications on a user's own Stable Diffusion folder with critics from local folders and plug-in losses,
end to end through the real CLI at tiny settings: each command with each critic and with a --loss file runs
(the loss falls, summary.json and images are written, the metrics say where they come from), bad losses and
pickle critic folders stop with one line and exit status 2, and a model without critics asks for one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _tiny_critics import add_safety_checker, build_backbone, build_classifier, build_clip
from test_tasks_fixtures import build_tiny_latent_model

TINY = ["--steps", "3", "--grad", "exact", "--quiet"]
LOSS = ("import torch\n\n"
        "def brightness(images, *, prompts, indices):\n"
        "    return (images - 0.8).pow(2).flatten(1).mean(1)\n")


def cli(args, capsys):
    from adjointdpm.cli import run

    code = run([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    sd = build_tiny_latent_model(root / "sd")
    from adjointdpm.components import load_components

    comps = load_components(sd)
    with torch.no_grad():
        images = comps.generate([""] * 8, seed=0, steps=3)
    add_safety_checker(sd, images)
    (root / "loss.py").write_text(LOSS)
    return {"sd": sd, "classifier": build_classifier(root / "cls"), "judge": build_classifier(root / "judge", seed=1),
            "clip": build_clip(root / "clip"), "backbone": build_backbone(root / "bb"), "loss": f"{root / 'loss.py'}:brightness"}


def _summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    for f in ("before/grid.png", "after/grid.png", "comparison.png", "loss_curve.png"):
        assert (out / f).is_file(), f
    return s


@pytest.mark.parametrize("critic", ["classifier", "clip", "loss"])
def test_guide_with_each_critic(tmp_path, capsys, world, critic):
    extra = {"classifier": ["--classifier", world["classifier"], "--target-class", "dog", "--judge", world["judge"]],
             "clip": ["--clip", world["clip"], "--clip-prompt", "a photo of a cat", "--judge", world["judge"]],
             "loss": ["--loss", world["loss"]]}[critic]
    out = tmp_path / "guide"
    code, stdout, err = cli(["guide", "--model", world["sd"], "--out", out, "-n", "2", "--iters", "3", "--lr", "0.3",
                             "--views", "0", *extra, *TINY], capsys)
    assert code == 0, err
    s = _summary(out)
    assert s["loss"]["min"] < s["loss"]["first"]
    metric = {"classifier": "critic_accuracy", "clip": "clip_score", "loss": "plugin_loss"}[critic]
    assert metric in s["before"] and metric in s["after"]
    if critic == "classifier":
        assert s["settings"]["target_label"] == "dog" and s["settings"]["target_index"] == 1
        assert "judge_accuracy" in s["after"] and s["metrics_from"].startswith("the judge")
    elif critic == "clip":  # a classifier judge of a text target: what it sees
        assert sum(s["after"]["judge_top_labels"].values()) == 2 and s["metrics_from"].startswith("the judge")
    else:
        assert "optimised critic only" in s["metrics_from"]
    from safetensors.torch import load_file

    assert load_file(str(out / "latents.safetensors"))["latents"].shape == (2, 4, 8, 8)


@pytest.mark.parametrize("attack", ["classifier", "safety"])
def test_audit_with_a_classifier_and_the_pipeline_safety_checker(tmp_path, capsys, world, attack):
    extra = ["--classifier", world["classifier"], "--judge", world["judge"]] if attack == "classifier" else []
    out = tmp_path / "audit"
    code, _, err = cli(["audit", "--model", world["sd"], "--attack", attack, "--out", out, "-n", "4", "--iters", "3",
                        "--eps", "0.5", "--step-size", "0.3", *extra, *TINY], capsys)
    assert code == 0, err
    s = _summary(out)
    assert s["after"]["n_attacked"] >= 1 and s["after"]["linf_max"] <= 0.5 + 1e-6 and s["before"]["success_rate"] == 0
    assert s["after"]["success_rate"] > 0 or s["loss"]["min"] < s["loss"]["first"]
    assert ("judge_keeps_label" in s["after"]) == (attack == "classifier")
    if attack == "safety":
        assert s["before"]["flag_rate"] == 1.0  # the attacked samples are the flagged ones


@pytest.mark.parametrize("objective", ["backbone", "loss"])
def test_stylize_with_a_backbone_or_a_loss(tmp_path, capsys, world, objective):
    from PIL import Image

    ref = tmp_path / "style.jpg"
    Image.fromarray((torch.rand(40, 30, 3) * 255).byte().numpy()).save(ref)  # any image file, any size
    extra = (["--backbone", world["backbone"], "--reference", ref, "--judge", world["clip"]] if objective == "backbone"
             else ["--loss", world["loss"]])
    out = tmp_path / "stylize"
    code, _, err = cli(["stylize", "--model", world["sd"], "--out", out, "--n-train", "2", "--batch", "2", "--n-eval", "2",
                        "--lora-rank", "2", "--lr", "0.02", "--iters", "3", "--prompt", "a photo", *extra, *TINY], capsys)
    assert code == 0, err
    s = _summary(out)
    assert s["loss"]["min"] < s["loss"]["first"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    if objective == "backbone":
        assert s["after"]["style_loss"] < s["before"]["style_loss"] and "judge_clip_score" in s["after"]
        assert (out / "reference" / "grid.png").is_file()
    else:
        assert "plugin_loss" in s["after"]


def test_invert_with_a_loss_and_with_an_image_folder(tmp_path, capsys, world):
    from PIL import Image

    out = tmp_path / "invert"
    code, _, err = cli(["invert", "--model", world["sd"], "--out", out, "--n-train", "2", "--n-heldout", "1",
                        "--iters", "3", "--loss", world["loss"], *TINY], capsys)
    assert code == 0, err
    s = _summary(out)
    assert s["loss"]["min"] < s["loss"]["first"] and "plugin_loss_heldout" in s["after"]
    targets = tmp_path / "targets"
    targets.mkdir()
    for i, colour in enumerate([(250, 240, 230), (20, 30, 200)]):
        Image.new("RGB", (32, 24), colour).save(targets / f"{i}.jpg")  # JPEG, another size: resized
    out2 = tmp_path / "invert2"
    code, _, err = cli(["invert", "--model", world["sd"], "--out", out2, "--targets", targets, "--n-heldout", "0",
                        "--iters", "3", *TINY], capsys)
    assert code == 0, err
    s = _summary(out2)
    assert s["settings"]["n_train"] == 2 and s["loss"]["min"] < s["loss"]["first"]
    assert s["after"]["psnr_train"] > s["before"]["psnr_train"]


def test_bad_losses_and_critic_folders_are_one_line(tmp_path, capsys, world):
    import pickle

    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\ndef detached(images):\n    return images.detach().mean((1, 2, 3))\n\n"
                   "def wrong_shape(images):\n    return images.mean(1)\n\n"
                   "def nan(images):\n    return images.mean((1, 2, 3)) * float('nan')\n")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"architectures": ["ResNetForImageClassification"]}')
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    base = ["--model", world["sd"], "-n", "1", "--iters", "1", *TINY]
    cases = [
        (["guide", "--loss", f"{bad}:detached", *base], "no gradient reaches them"),
        (["stylize", "--loss", f"{bad}:wrong_shape", "--model", world["sd"], "--n-train", "1", "--batch", "1",
          "--n-eval", "1", "--iters", "1", *TINY], "returned shape"),
        (["invert", "--loss", f"{bad}:nan", "--model", world["sd"], "--n-train", "1", "--n-heldout", "0", "--iters", "1",
          *TINY], "non-finite"),
        (["guide", "--classifier", pickled, "--target-class", "0", *base], "pickle weights are never loaded"),
        (["guide", "--classifier", world["classifier"], "--target-class", "horse", *base], "no class named 'horse'"),
        (["guide", "--classifier", world["classifier"], *base], "needs --target-class"),
        (["guide", *base], "give an objective"),
        (["stylize", "--model", world["sd"], "--n-train", "1", "--batch", "1", "--n-eval", "1", *TINY], "give an objective"),
        (["audit", "--judge", world["clip"], "--classifier", world["classifier"], *base], "must be an image classifier"),
    ]
    for i, (args, match) in enumerate(cases):
        code, _, err = cli([*args, "--out", tmp_path / f"o{i}"], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (args, err)
        assert match in lines[0] and lines[0].startswith("adjointdpm: error:") and "Traceback" not in err, (args, err)
