"""guide stays on the model's manifold: keep-best never returns an iterate flagged off the manifold while one on
it exists, a sample is done only when the critic is satisfied on the manifold, the priors (denoising error,
noise typicality) reach the loss on any family with a plug-in loss, and summary.json carries the per-image
flag. audit reports the same flag."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

LOSS = "def bright(images, *, prompts, indices):\n    return (images - 0.8).pow(2).flatten(1).mean(1)\n"


class _ScriptedCheck:
    """A manifold check whose z-scores follow a script, one row per call (keep-best sees them as flags)."""

    def __init__(self, script, threshold=6.0):
        from adjointdpm.apps.manifold import ManifoldCalibration

        self.script, self.calls = script, 0
        self.calibration = ManifoldCalibration(0.0, 1.0, threshold)

    def z(self, x0):
        row = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return torch.tensor(row, dtype=x0.dtype)[: x0.shape[0]] + 0 * x0.flatten(1).sum(1)

    def flags(self, x0):
        z = self.z(x0)
        return z, z > self.calibration.threshold


def _task(tmp_path, **kw):
    from adjointdpm.apps import guide
    from adjointdpm.apps.options import EngineOptions
    from adjointdpm.apps.session import Session

    s = Session(EngineOptions(steps=3, grad="exact"))
    (tmp_path / "loss.py").write_text(LOSS)
    opts = guide.Options(n=2, iters=3, views=0, loss=f"{tmp_path / 'loss.py'}:bright", calibration_samples=4, **kw)
    task = guide.build(s, opts)
    task.setup()
    return task


def test_keep_best_skips_iterates_off_the_manifold(tmp_path):
    task = _task(tmp_path, stop_loss=0.0)
    # sample 0: on the manifold only at the first iterate; sample 1: always on it
    task.manifold = _ScriptedCheck([[0.0, 0.0], [9.0, 0.0], [9.0, 0.0]])
    opt = task.make_optimizer(task.param_groups())
    firsts = []
    for it in range(3):
        opt.zero_grad()
        loss, logs = task.compute_loss(it, torch.Generator().manual_seed(it))
        firsts.append(task.x.detach().clone())
        loss.backward()
        opt.step()
        with torch.no_grad():
            task.after_step(it)
    result = task.result_x()
    assert torch.equal(result[0], firsts[0][0])  # the only iterate on the manifold, whatever its loss
    assert task.best_loss[0] < task.OFF_MANIFOLD_RANK and task.best_loss[1] < task.OFF_MANIFOLD_RANK
    assert logs["off_manifold"] == 0.5


def test_a_flagged_iterate_does_not_finish_a_sample(tmp_path):
    task = _task(tmp_path, stop_loss=1e3)  # the critic is satisfied at once
    task.manifold = _ScriptedCheck([[9.0, 0.0]])
    task.compute_loss(0, torch.Generator().manual_seed(0))
    assert task.done.tolist() == [False, True]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from _tiny_families import build_tiny_flux

    root = tmp_path_factory.mktemp("guide_manifold")
    (root / "loss.py").write_text(LOSS)
    return build_tiny_flux(root / "flux"), f"{root / 'loss.py'}:bright"


def test_priors_and_flag_on_flux_with_a_plugin_loss(tmp_path, capsys, flux):
    from adjointdpm.cli import run

    folder, loss = flux
    out = tmp_path / "g"
    code = run([str(a) for a in ["guide", "--model", folder, "--out", out, "-n", "2", "--iters", "2", "--views", "0",
                                 "--prompt", "a photo", "--loss", loss, "--steps", "3", "--quiet",
                                 "--manifold-weight", "0.5", "--typicality-weight", "0.5", "--calibration-samples", "4"]])
    assert code == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    after = s["after"]
    assert len(after["manifold_z"]) == 2 and len(after["off_manifold"]) == 2 and len(after["noise_typicality_z"]) == 2
    assert after["off_manifold_count"] == sum(after["off_manifold"])
    assert s["manifold_calibration"]["plain_samples"] == 4
    assert s["settings"]["manifold_weight"] == 0.5 and s["settings"]["typicality_weight"] == 0.5


def test_the_typicality_prior_reaches_the_gradient(tmp_path):
    plain = _task(tmp_path, manifold_threshold=0.0)
    prior = _task(tmp_path, manifold_threshold=0.0, typicality_weight=1.0)
    grads = []
    for task in (plain, prior):
        loss, _ = task.compute_loss(0, torch.Generator().manual_seed(0))
        loss.backward()
        grads.append(task.x.grad.clone())
    from adjointdpm.apps.manifold import typicality_penalty

    x = prior.x.detach().clone().requires_grad_(True)
    (typicality_penalty(x).sum() / x.shape[0]).backward()
    assert torch.allclose(grads[1] - grads[0], x.grad, atol=1e-5)


def test_bad_manifold_options_are_one_line_errors(tmp_path):
    from adjointdpm.apps.errors import UserInputError

    with pytest.raises(UserInputError, match="--manifold-weight"):
        _task(tmp_path, manifold_weight=-1.0)


def test_audit_reports_the_flag(tmp_path, capsys):
    from adjointdpm.cli import run

    out = tmp_path / "a"
    code = run([str(a) for a in ["audit", "--out", out, "-n", "4", "--iters", "1", "--steps", "8", "--quiet"]])
    assert code == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    for stage in ("before", "after"):
        assert len(s[stage]["manifold_z"]) == 4 and s[stage]["off_manifold_count"] == sum(s[stage]["off_manifold"])
    assert s["before"]["manifold_calibration"]["plain_samples"] == 4
    assert s["off_manifold_after"] == s["after"]["off_manifold_count"]
