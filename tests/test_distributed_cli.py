"""The commands under ``torchrun --nproc_per_node 2 -m adjointdpm …`` (gloo on CPU) give the single-process result
on the same global batch: ``stylize`` (data parallel: shards of the minibatch, gradients summed) trains the same
LoRA weights, ``guide`` (sharded noises) optimises the same noises. Only the first process writes to --out and
shows a progress bar."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _helpers import torchrun
from adjointdpm.cli import run as cli_run

STYLIZE = ["stylize", "--lora-rank", "2", "--n-train", "4", "--batch", "4", "--n-eval", "2", "--iters", "2",
           "--lr", "1e-3", "--steps", "3", "--grad", "exact"]
GUIDE = ["guide", "-n", "4", "--iters", "3", "--lr", "0.2", "--steps", "3", "--grad", "exact"]
# stochastic: each sample's injected noises (its own seeded stream) optimised in its own process
NOISES = {"guide_noises": GUIDE + ["--solver", "ddpm", "--optimize-noises", "--stop-loss", "0"],
          "audit_noises": ["audit", "-n", "6", "--iters", "2", "--eps", "0.5", "--step-size", "0.3", "--steps", "3",
                           "--grad", "exact", "--solver", "euler_ancestral", "--optimize-noises"]}


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def _relative(a: dict, b: dict, keys=None) -> float:
    """‖a − b‖ / ‖b‖ over the named tensors taken together."""
    keys = sorted(b) if keys is None else keys
    fa = torch.cat([a[k].double().flatten() for k in keys])
    fb = torch.cat([b[k].double().flatten() for k in keys])
    return float((fa - fb).norm() / fb.norm())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{command: (two-process out, single-process out, per-rank logs)}."""
    root = tmp_path_factory.mktemp("ddp_cli")
    torch.set_num_threads(1)  # as each torchrun process (a module fixture runs before the per-test one-thread fixture)
    result = {}
    for name, args in {"stylize": STYLIZE, "guide": GUIDE, **NOISES}.items():
        two, one, logs = root / f"{name}_2", root / f"{name}_1", root / f"{name}_logs"
        # per-rank stdout/stderr into files, the progress bar on (no --quiet)
        proc = torchrun(2, ["--log-dir", str(logs), "--redirects", "3", "-m", "adjointdpm", *args, "--out", str(two)])
        assert proc.returncode == 0, proc.stderr[-3000:] + "".join(p.read_text()[-2000:] for p in logs.rglob("*.log"))
        assert cli_run([*args, "--out", str(one), "--quiet"]) == 0
        result[name] = (two, one, logs)
    return result


def _rank_log(logs: Path, rank: int, stream: str) -> str:
    (path,) = [p for p in logs.rglob(f"{stream}.log") if p.parent.name == str(rank)]
    return path.read_text()


def test_stylize_data_parallel_equals_single_process(runs):
    two, one, _ = runs["stylize"]
    a, b = load_file(str(two / "pytorch_lora_weights.safetensors")), load_file(str(one / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert _relative(a, b) <= 1e-6
    # the trained part: LoRA's B matrices start at zero, so they are the whole update. Adam's first steps are
    # nearly sign(gradient): the rounding of a gradient summed in another order shows in elements whose gradient
    # is ~0, hence the looser bound on the update alone (it is ~1e-5 measured; a wrong gradient gives ~1)
    trained = [k for k in b if "lora_B" in k]
    assert min(float(b[k].abs().max()) for k in trained) > 1e-4, "the weights must move for the test to mean anything"
    assert _relative(a, b, trained) <= 1e-3
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (two, one))
    assert sa["model_calls"] == sb["model_calls"] and sa["iterations"] == sb["iterations"] == 2
    losses = [(h["loss"], g["loss"]) for h, g in zip(sa["loss"]["history"], sb["loss"]["history"])]
    assert all(abs(x - y) <= 1e-5 * abs(y) for x, y in losses), losses
    assert sa["after"]["style_loss"] == pytest.approx(sb["after"]["style_loss"], rel=1e-3)


def test_guide_sharded_noises_equal_single_process(runs):
    two, one, _ = runs["guide"]
    a, b = load_file(str(two / "latents.safetensors")), load_file(str(one / "latents.safetensors"))
    assert a["latents"].shape == b["latents"].shape == (4, 1, 16, 16)
    # (the manifold prior's denoiser calls run on each process's rows: its batch-size rounding, amplified by the
    # normalised steps, shows at ~1e-5; a wrong sharding gives ~0.1)
    assert _relative(a, b) <= 1e-4
    from adjointdpm.components import load_components

    initial = {"latents": load_components().noise(4, 0)}
    assert _relative(b, initial) > 1e-2, "the noises must move for the test to mean anything"
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (two, one))
    assert sa["model_calls"] == sb["model_calls"] and sa["iterations"] == sb["iterations"] == 3
    assert sa["after"]["judge_class_histogram"] == sb["after"]["judge_class_histogram"]
    assert [h["loss"] for h in sa["loss"]["history"]] == pytest.approx([h["loss"] for h in sb["loss"]["history"]],
                                                                         rel=1e-4)


@pytest.mark.parametrize("name, file", [("guide_noises", "latents.safetensors"), ("audit_noises", "attack.safetensors")])
def test_sharded_injected_noises_equal_single_process(runs, name, file):
    two, one, _ = runs[name]
    a, b = load_file(str(two / file)), load_file(str(one / file))
    n = b["latents"].shape[0]
    assert a.keys() == b.keys() and b["noises"].shape == (3, n, *b["latents"].shape[1:])
    # (audit's ℓ∞ projection of normalised steps shows the other processes' rounding at ~5e-6; a wrong
    # sharding of the noises gives ~0.1)
    assert _relative(a, b, ["latents", "noises"]) <= 1e-4
    start = "original_noises" if "original_noises" in b else None
    if start is not None:  # the attack moved the noises (the streams are the same in both runs)
        assert torch.equal(a[start], b[start]) and (b["noises"] - b[start]).abs().max() > 1e-2
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (two, one))
    numbers = {k for k, v in sb["after"].items() if isinstance(v, float)}
    assert numbers and {k: sa["after"][k] for k in numbers} == pytest.approx({k: sb["after"][k] for k in numbers}, rel=1e-4)
    assert {k: v for k, v in sa["after"].items() if k not in numbers} == {k: v for k, v in sb["after"].items() if k not in numbers}


@pytest.mark.parametrize("name", ["stylize", "guide"])
def test_only_the_first_process_writes_and_shows_progress(runs, name):
    two, one, logs = runs[name]
    assert _files(two) == _files(one)  # the same outputs, no stray files of the other process
    assert not list(two.rglob(".*"))
    assert "%|" in _rank_log(logs, 0, "stderr") and "wrote" in _rank_log(logs, 0, "stdout")
    assert "%|" not in _rank_log(logs, 1, "stderr") and "wrote" not in _rank_log(logs, 1, "stdout")
