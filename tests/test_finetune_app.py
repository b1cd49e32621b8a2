"""``adjointdpm finetune`` beyond the application contract (tests/test_tasks_contract.py): every bad input is
one line, exit 2, nothing written; ``sample --lora`` reproduces the run's after-images; TensorBoard event
files read back; Adjoint Matching's running threshold survives ``--resume``; the digits recipe's defaults."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from test_tasks_contract import cli

TINY = ["--steps", "3", "--quiet", "--batch", "2", "--eval-seeds", "2"]

PLUGINS = '''
import torch

def wrong_shape(images, prompts, fields):
    return images.mean(dim=(2, 3))

def no_gradient(images, prompts, fields):
    return images.detach().mean(dim=(1, 2, 3))
'''


@pytest.fixture
def plugins(tmp_path):
    path = tmp_path / "plugins.py"
    path.write_text(PLUGINS)
    return path


def _cases(tmp_path, plugins):
    empty_folder = tmp_path / "empty_clip"
    empty_folder.mkdir()
    (empty_folder / "config.json").write_text("{}")
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("# nothing\n\n")
    return {
        "kind": (["--reward", "imagereward:/m"], "unknown reward kind 'imagereward'"),
        "no-safetensors": (["--reward", f"clip:{empty_folder}"], "has no .safetensors weights"),
        "empty-prompts": (["--prompts", str(empty_file)], "holds no prompts"),
        "missing-prompts": (["--prompts", str(tmp_path / "nope.txt")], "does not exist"),
        "shape": (["--reward", f"{plugins}:wrong_shape"], "shape (2,)"),
        "no-gradient": (["--reward", f"{plugins}:no_gradient"], "no gradient"),
        "lambda": (["--method", "adjoint-matching", "--reward-scale", "-1"], "--reward-scale must be a number > 0"),
        "sampler": (["--method", "adjoint", "--solver", "ddpm"], "cannot take the stochastic sampler"),
        "kl": (["--kl", "-0.5"], "--kl must be a number ≥ 0"),
        "kl-method": (["--method", "onestep", "--kl", "1"], "the method 'onestep' does not take it"),
        "method": (["--method", "draft"], "unknown fine-tuning method 'draft'"),
        "report": (["--report-to", "wandb"], "--report-to must be none or tensorboard"),
        "lr-scheduler": (["--lr-scheduler", "cosin"], "--lr-scheduler must be one of constant,"),
        "warmup-constant": (["--method", "exact", "--lr-warmup-steps", "5"], "pass --lr-scheduler constant_with_warmup"),
        "warmup-negative": (["--lr-scheduler", "cosine", "--lr-warmup-steps", "-1"], "--lr-warmup-steps must be >= 0"),
    }


@pytest.mark.parametrize("case", ["kind", "no-safetensors", "empty-prompts", "missing-prompts", "shape",
                                  "no-gradient", "lambda", "sampler", "method", "report", "kl", "kl-method",
                                  "lr-scheduler", "warmup-constant", "warmup-negative"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, plugins, case):
    args, words = _cases(tmp_path, plugins)[case]
    out = tmp_path / "out"
    code, _, err = cli(["finetune", *TINY, "--iters", "1", "--out", out, *args])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("adjointdpm: error:"), err
    assert words in lines[0] and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A short LoRA run that changes the images (lr high enough to move them in 2 iterations)."""
    out = tmp_path_factory.mktemp("finetune") / "run"
    code, _, err = cli(["finetune", *TINY, "--method", "exact", "--iters", "2", "--lr", "0.02", "--eval-every", "1",
                        "--report-to", "tensorboard", "--out", out])
    assert code == 0, err
    return out


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_sample_with_the_lora_gives_the_after_images(tuned, tmp_path):
    """Prompt 8's evaluation row is what ``sample --lora`` draws for that prompt with the evaluation seed."""
    s = json.loads((tuned / "summary.json").read_text())
    seed = s["seed"] + 104729
    prompt = "a handwritten digit eight"
    base, lora = tmp_path / "base", tmp_path / "lora"
    for folder, extra in ((base, []), (lora, ["--lora", tuned])):
        code, _, err = cli(["sample", "-p", prompt, "-n", "2", "--seed", seed, "--steps", "3", "--out", folder, *extra])
        assert code == 0, err
    for j in range(2):
        after = _png(tuned / "after" / f"{16 + j:03d}.png")
        before = _png(tuned / "before" / f"{16 + j:03d}.png")
        assert np.abs(_png(lora / f"{j:03d}.png") - after).max() <= 1  # (same sampler; PNG rounding)
        assert np.abs(_png(base / f"{j:03d}.png") - before).max() <= 1
    assert np.abs(_png(lora / "000.png") - _png(base / "000.png")).max() > 10  # the LoRA changed them


def test_load_weights_puts_the_trained_lora_back(tuned):
    """The Python twin of ``sample --lora``: a fresh model's LoRA tensors equal the saved ones, and the
    network's output differs from the base model's."""
    from peft.utils import get_peft_model_state_dict

    from adjointdpm.apps.weights import load_weights
    from adjointdpm.components import load_components

    comps = load_components()
    x, t = torch.randn(1, *comps.noise(1, 0).shape[1:]), torch.tensor([500])
    cond = comps.encode_prompt(["a handwritten digit eight"])
    with torch.no_grad():
        base = comps.network(x, t, encoder_hidden_states=cond).sample
    assert load_weights(comps, tuned) == "lora"
    saved = load_file(str(tuned / "pytorch_lora_weights.safetensors"))
    loaded = get_peft_model_state_dict(comps.network)
    assert len(saved) == len(loaded) > 0
    for k, v in loaded.items():
        assert torch.equal(saved[f"unet.{k}"], v), k
    with torch.no_grad():
        assert (comps.network(x, t, encoder_hidden_states=cond).sample - base).abs().max() > 1e-4


def test_tensorboard_event_files_read_back(tuned):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tuned / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/reward", "eval/reward", "eval/judge", "eval/diversity"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    s = json.loads((tuned / "summary.json").read_text())
    assert [e.value for e in events.Scalars("eval/reward")] == pytest.approx([p["reward"] for p in s["evaluations"]])
    assert "eval/images" in tags["images"] and len(events.Images("eval/images")) == 3


def test_summary_records_the_curves_and_evaluations(tuned):
    s = json.loads((tuned / "summary.json").read_text())
    points = s["evaluations"]
    assert [p["stage"] for p in points] == ["before", "iteration", "after"]
    assert [p["iteration"] for p in points] == [0, 1, 2]
    assert points[0]["calls"] == 0 < points[1]["calls"] < points[2]["calls"]
    assert "hacking_alarm" in s and s["after"]["per_prompt"]["a handwritten digit nine"]["judge_accuracy"] in (0, 0.5, 1)
    assert (tuned / "curves.png").is_file() and len(list((tuned / "prompts").glob("*.png"))) == 10


def test_adjoint_matching_resumes_identically(tmp_path):
    """Its running outlier threshold (the method's state) is checkpointed: 1 + 1 resumed = 2 iterations."""
    args = ["finetune", *TINY, "--method", "adjoint-matching", "--eval-every", "5", "--checkpoint-every", "1"]
    full, part = tmp_path / "full", tmp_path / "part"
    for extra in ([full, "--iters", "2"], [part, "--iters", "1"], [part, "--iters", "2", "--resume"]):
        code, _, err = cli([*args, "--out", *extra])
        assert code == 0, err
    a, b = (json.loads((f / "summary.json").read_text()) for f in (full, part))
    assert [h["loss"] for h in a["loss"]["history"]] == [h["loss"] for h in b["loss"]["history"]]
    assert a["after"] == b["after"] and a["evaluations"][-1]["calls"] == b["evaluations"][-1]["calls"]
    ta, tb = (load_file(str(f / "pytorch_lora_weights.safetensors")) for f in (full, part))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a["settings"]["method"].startswith("adjoint-matching:reward_scale=")


def test_the_learning_rate_follows_diffusers_schedule_and_resumes(tmp_path):
    """--lr-scheduler cosine --lr-warmup-steps 1: each iteration steps at lr·λ(i) of diffusers' get_scheduler
    over --iters (λ(0) = 0: the first step moves nothing); a run stopped early (by --budget) and resumed follows the
    same schedule to the same weights; resuming with other --iters, which would change the schedule, is refused."""
    from diffusers.optimization import get_scheduler

    args = ["finetune", *TINY, "--method", "alignprop", "--lr", "0.01", "--lr-scheduler", "cosine",
            "--lr-warmup-steps", "1", "--eval-every", "5", "--checkpoint-every", "1", "--iters", "4"]
    full, part = tmp_path / "full", tmp_path / "part"
    for extra in ([full], [part, "--budget", "40"], [part, "--resume"]):
        code, _, err = cli([*args, "--out", *extra])
        assert code == 0, err
        if "--budget" in extra:  # (stopped before the end of the schedule)
            stopped = json.loads((part / "summary.json").read_text())
            assert stopped["stopped_by"] == "budget" and 1 <= stopped["iterations"] < 4, stopped["iterations"]
    a, b = (json.loads((f / "summary.json").read_text()) for f in (full, part))
    probe = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    factor = get_scheduler("cosine", probe, num_warmup_steps=1, num_training_steps=4).lr_lambdas[0]
    expected = [0.01 * factor(i) for i in range(4)]
    assert expected[0] == 0 and expected[1] == pytest.approx(0.01) and 0 < expected[3] < expected[2] < 0.01
    for summary in (a, b):
        assert [h["lr"] for h in summary["loss"]["history"]] == pytest.approx(expected, rel=1e-12)
    assert a["settings"]["lr_scheduler"] == "cosine" and a["settings"]["lr_warmup_steps"] == 1
    ta, tb = (load_file(str(f / "pytorch_lora_weights.safetensors")) for f in (full, part))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(ta[k].any() for k in ta if "lora_B" in k)  # (the later steps moved the LoRA)
    code, _, err = cli([*args, "--out", full, "--iters", "6", "--resume"])
    assert code == 2 and "different settings (lr_schedule_iters)" in err


def test_defaults_are_the_digits_recipe():
    from adjointdpm.apps.finetune import DEFAULT_METHOD, METHOD_RECIPES, Options, lr_schedule_of, method_recipe

    method, lr = method_recipe(Options())
    assert method.name == DEFAULT_METHOD.partition(":")[0] and lr == METHOD_RECIPES[method.name]["lr"]
    am, am_lr = method_recipe(Options(method="adjoint-matching"))
    assert am.reward_scale == METHOD_RECIPES["adjoint-matching"]["reward_scale"]
    assert am_lr == METHOD_RECIPES["adjoint-matching"]["lr"]
    assert method_recipe(Options(method="adjoint-matching", reward_scale=3.0))[0].reward_scale == 3.0
    assert Options().iters == METHOD_RECIPES[DEFAULT_METHOD].get("iters", 40) and Options(iters=3).iters == 3
    assert Options(method="adjoint-matching:steps=2").iters == METHOD_RECIPES["adjoint-matching"].get("iters", 40)
    recipe_kl = METHOD_RECIPES[DEFAULT_METHOD].get("kl")
    assert (method.anchor.weight if method.anchor else None) == recipe_kl
    assert lr_schedule_of(Options()) == METHOD_RECIPES[DEFAULT_METHOD].get("lr_scheduler", "constant")
    assert lr_schedule_of(Options(lr_scheduler="linear")) == "linear"  # --lr-scheduler over the recipe's
    assert lr_schedule_of(Options(method="exact")) == "constant"  # (a recipe that names none)
    assert method_recipe(Options(kl=0.25))[0].anchor.weight == 0.25  # --kl over the recipe's
    assert method_recipe(Options(method="alignprop:kl=2", kl=0.25))[0].anchor.weight == 2.0  # the spec over --kl
    assert method_recipe(Options(kl=0))[0].anchor is None and method_recipe(Options(method="exact"))[0].anchor is None


def test_the_hacking_alarm_rings_when_the_judge_falls(tmp_path):
    """A reward the judge disagrees with (darker is better): as it rises the judge's reward falls, and the run
    says so, in its output and in summary.json."""
    plugin = tmp_path / "dark.py"
    plugin.write_text("def darkness(images, prompts, fields):\n    return -images.mean(dim=(1, 2, 3))\n")
    out = tmp_path / "run"
    code, stdout, err = cli(["finetune", *TINY, "--method", "exact", "--iters", "3", "--lr", "0.05",
                             "--eval-every", "1", "--reward", f"{plugin}:darkness", "--judge-reward", "digits-judge",
                             "--out", out])
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    rewards, judges = [p["reward"] for p in s["evaluations"]], [p["judge"] for p in s["evaluations"]]
    assert rewards[-1] > rewards[0] and judges[-1] < judges[0]
    assert s["hacking_alarms"] and s["hacking_alarm"] == s["hacking_alarms"][-1]["message"]
    assert "finetune: reward hacking?" in stdout


def test_evaluations_do_not_change_the_training(tmp_path):
    """The weights after N iterations do not depend on how often the run evaluates (an evaluation draws no
    training randomness): the defaults' run equals a run measured with another --eval-every."""
    outs = []
    for every in ("1", "5"):
        out = tmp_path / f"every{every}"
        code, _, err = cli(["finetune", *TINY, "--method", "alignprop", "--iters", "2", "--eval-every", every,
                            "--out", out])
        assert code == 0, err
        outs.append(load_file(str(out / "pytorch_lora_weights.safetensors")))
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_keep_best_writes_the_best_evaluated_weights_and_resumes(tmp_path):
    """--keep-best: a reward that training raises and evaluation lowers (brightness with a gradient, darkness
    without) is best before any step, so the run writes the untouched LoRA (B = 0) and its after-evaluation is
    its before-evaluation; interrupted and resumed, it keeps the same best."""
    plugin = tmp_path / "flip.py"
    plugin.write_text("def flip(images, prompts, fields):\n    s = images.mean(dim=(1, 2, 3))\n"
                      "    return s if images.requires_grad else -s\n")
    args = ["finetune", *TINY, "--method", "exact", "--lr", "0.05", "--eval-every", "1", "--checkpoint-every", "1",
            "--reward", f"{plugin}:flip", "--keep-best"]
    full, part = tmp_path / "full", tmp_path / "part"
    for extra in ([full, "--iters", "2"], [part, "--iters", "1"], [part, "--iters", "2", "--resume"]):
        code, stdout, err = cli([*args, "--out", *extra])
        assert code == 0, err
    s = json.loads((full / "summary.json").read_text())
    rewards = [p["reward"] for p in s["evaluations"]]
    assert s["kept_best"]["iteration"] == 0 and rewards[1] < rewards[0]
    assert s["after"]["reward"] == pytest.approx(s["before"]["reward"], abs=1e-6)
    lora = load_file(str(full / "pytorch_lora_weights.safetensors"))
    assert all(not v.any() for k, v in lora.items() if "lora_B" in k)
    assert json.loads((part / "summary.json").read_text())["kept_best"] == s["kept_best"]
    resumed = load_file(str(part / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(lora[k], resumed[k]) for k in lora)
