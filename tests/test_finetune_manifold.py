"""finetune's evaluation checks every image against the base model's manifold: summary.json records the flag at
every evaluation (count, fraction, per prompt, the flagged indices) and the final line prints it; a network
broken on purpose (its LoRA, or all its weights, set to large random values) has its images flagged while the
base model's own evaluation images are not, and the check reads the base model without disturbing the trained
weights."""
from __future__ import annotations

import json

import pytest
import torch

from test_tasks_contract import cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

TEXTS = ["a handwritten digit three", "a handwritten digit seven"]
PROMPTS = '{"prompt": "a handwritten digit three", "class": 3}\n{"prompt": "a handwritten digit seven", "class": 7}\n'


def test_every_evaluation_records_the_flag(tmp_path):
    (tmp_path / "eval.jsonl").write_text(PROMPTS)
    out = tmp_path / "run"
    code, stdout, err = cli(["finetune", "--steps", "3", "--quiet", "--batch", "2", "--eval-seeds", "2", "--iters", "2",
                             "--eval-every", "1", "--method", "exact", "--eval-prompts", tmp_path / "eval.jsonl",
                             "--out", out])
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert [e["stage"] for e in s["evaluations"]] == ["before", "iteration", "after"]
    for e in s["evaluations"]:
        assert 0 <= e["flagged"] <= 4 and e["flagged_fraction"] == e["flagged"] / 4
    after = s["after"]
    assert len(after["manifold_z"]) == 4 and after["off_manifold_count"] == s["evaluations"][-1]["flagged"]
    assert s["off_manifold_after"] == len(s["off_manifold_images_after"]) == after["off_manifold_count"]
    assert all(i in range(4) and after["manifold_z"][i] > 6 for i in s["off_manifold_images_after"])
    assert sorted(s["off_manifold_per_prompt_after"]) == sorted(TEXTS)
    assert sum(s["off_manifold_per_prompt_after"].values()) == s["off_manifold_after"]
    cal = s["manifold_calibration"]
    assert cal["plain_samples"] == 4 and cal["threshold"] == 6.0
    assert "off_manifold_fraction" in stdout.strip().splitlines()[-1], stdout


def _task(tmp_path, lora_rank: int):
    """A finetune task on the embedded model (20 steps, as the recipe samples) with two evaluation prompts × 8
    seeds, set up but not trained."""
    from adjointdpm.apps import finetune
    from adjointdpm.apps.options import EngineOptions
    from adjointdpm.apps.session import Session

    (tmp_path / "eval.jsonl").write_text(PROMPTS)
    session = Session(EngineOptions())
    task = finetune.build(session, finetune.Options(eval_prompts=str(tmp_path / "eval.jsonl"), eval_seeds=8,
                                                    lora_rank=lora_rank, iters=1))
    task.setup()
    return task


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_a_broken_network_is_flagged_and_the_base_model_is_not(tmp_path, lora_rank):
    task = _task(tmp_path, lora_rank)
    before = task.evaluate("before").metrics
    # the base model's own images calibrate the flag: its tail flags about 1 % of them
    assert before["off_manifold_count"] <= 1 and before["manifold_calibration"]["plain_samples"] == 16
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in task.params.values():
            # LoRA: random adapters of std 0.3 (B starts at zero); all weights: noise of half their mean magnitude
            scale = 0.3 if lora_rank else 0.5 * float(p.abs().mean())
            p.add_(torch.randn(p.shape, generator=g).to(p) * scale)
    broken = {k: p.detach().clone() for k, p in task.params.items()}
    after = task.evaluate("after").metrics
    assert after["off_manifold_fraction"] >= 0.75, after["manifold_z"]
    assert sum(v["off_manifold"] for v in after["per_prompt"].values()) == after["off_manifold_count"]
    assert task.evaluations[-1]["flagged"] == after["off_manifold_count"]
    # a resumed run calibrates on the base model's images of the same noises: the same calibration
    calibration, task.manifold_calibration = task.manifold_calibration, None
    again = task.evaluate("iteration 1").metrics
    assert task.manifold_calibration.centre == pytest.approx(calibration.centre, abs=1e-5)
    assert again["off_manifold_count"] == after["off_manifold_count"]
    # reading the base model left the trained (here: broken) weights and their gradient switches as they were
    for k, p in task.params.items():
        assert torch.equal(p, broken[k]) and p.requires_grad, k


def test_a_non_finite_score_is_flagged():
    from adjointdpm.apps.manifold import off_manifold

    z = torch.tensor([float("nan"), float("inf"), 7.0, 6.0, -1.0])
    assert off_manifold(z, 6.0).tolist() == [True, True, True, False, False]
