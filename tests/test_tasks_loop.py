"""The shared optimisation loop: checkpoints, resume, SIGINT, non-finite handling, budget (a toy task,
no diffusion model: these are properties of the loop alone)."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from _helpers import PoisonGradient
from adjointdpm.apps.errors import Interrupted, NonFiniteError, UserInputError
from adjointdpm.apps.loop import Evaluation, LoopConfig, ParamGroup, Task, run


class Toy(Task):
    """min_x,w E‖x·w − target + noise‖² with per-iteration noise from the loop's generator; a 'counted'
    linear layer charges 1 forward + 1 backward per iteration."""

    name = "toy"

    def __init__(self, nan_at: int | None = None, nan_where: str = "grad", interrupt_at: int | None = None,
                 optimizer: str = "adamw"):
        self.nan_at, self.nan_where, self.interrupt_at, self.optimizer = nan_at, nan_where, interrupt_at, optimizer

    def describe(self):
        return {"toy": 1, "optimizer": self.optimizer}

    def setup(self):
        torch.manual_seed(0)
        self.x = torch.randn(3, 4, requires_grad=True)
        self.net = torch.nn.Linear(4, 4)
        self.target = torch.ones(3, 4)
        self.counter_state = torch.zeros(1)

    def param_groups(self):
        return [ParamGroup("x_T", {"x": self.x}, {"lr": 0.1}),
                ParamGroup("weights", dict(self.net.named_parameters()), {"lr": 0.05})]

    def make_optimizer(self, groups):
        if self.optimizer == "sgd":
            return torch.optim.SGD([{"params": list(g.tensors.values()), **g.options} for g in groups], momentum=0.9)
        return super().make_optimizer(groups)

    def counted_modules(self):
        return [self.net]

    def compute_loss(self, iteration, generator):
        if self.interrupt_at == iteration:
            os.kill(os.getpid(), signal.SIGINT)
        noise = 0.01 * torch.randn(3, 4, generator=generator)
        bad = self.nan_at == iteration
        x = PoisonGradient.apply(self.x) if bad and self.nan_where == "grad" else self.x
        y = self.net(x)
        if bad and self.nan_where == "weights":
            y = y + x @ PoisonGradient.apply(self.net.weight).T * 0
        loss = (y - self.target + noise).pow(2).mean()
        if bad and self.nan_where == "loss":
            loss = loss * float("inf")
        self.counter_state += 1
        return loss, {"noise": float(noise.sum())}

    def state_tensors(self):
        return {"count": self.counter_state}

    def load_state_tensors(self, tensors):
        self.counter_state = tensors["count"].clone()

    def evaluate(self, stage):
        with torch.no_grad():
            img = torch.tanh(self.net(self.x)).view(3, 1, 2, 2)
        return Evaluation(img, {"value": float(self.net(self.x).sum())})


def _cfg(tmp_path, name="run", **kw):
    kw.setdefault("iters", 6)
    kw.setdefault("checkpoint_every", 2)
    kw.setdefault("progress", False)
    return LoopConfig(out=tmp_path / name, **kw)


def _params(task):
    return [p.detach().clone() for g in task.param_groups() for p in g.tensors.values()]


def test_outputs_and_summary(tmp_path):
    task = Toy()
    s = run(task, _cfg(tmp_path))
    out = tmp_path / "run"
    for f in ("summary.json", "loss_curve.png", "comparison.png", "before/grid.png", "after/grid.png",
              "before/000.png", "after/002.png", "checkpoint/checkpoint.json"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 6 and summary["stopped_by"] == "iterations"
    assert summary["loss"]["last"] < summary["loss"]["first"]
    assert summary["model_calls"] == {"forward": 6, "backward": 6, "total": 12}  # evaluation is not counted
    assert summary["before"]["value"] != summary["after"]["value"]
    assert [h["iteration"] for h in summary["loss"]["history"]] == [1, 2, 3, 4, 5, 6]
    assert s == summary


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_equals_uninterrupted(tmp_path, optimizer):
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest itself runs in the background
    full = Toy(optimizer=optimizer)
    ref = run(full, _cfg(tmp_path, "full"))
    # an interrupted run: SIGINT during iteration 3 → finishes it, saves, raises Interrupted
    part = Toy(interrupt_at=3, optimizer=optimizer)
    with pytest.raises(Interrupted, match="after iteration 4"):
        run(part, _cfg(tmp_path, "part"))
    meta = json.loads((tmp_path / "part" / "checkpoint" / "checkpoint.json").read_text())
    assert meta["iteration"] == 4
    assert signal.getsignal(signal.SIGINT) is handler_before  # the caller's handler is restored
    resumed = Toy(optimizer=optimizer)
    res = run(resumed, _cfg(tmp_path, "part", resume=True))
    for a, b in zip(_params(full), _params(resumed)):
        assert torch.equal(a, b)
    assert [h["loss"] for h in res["loss"]["history"]] == [h["loss"] for h in ref["loss"]["history"]]
    assert res["after"] == ref["after"] and res["model_calls"] == ref["model_calls"]
    assert float(resumed.counter_state) == 6  # task state restored (4 + 2), not recounted


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path):
    run(Toy(), _cfg(tmp_path, iters=5))
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoint").iterdir())
    assert files == ["checkpoint.json", "state-000005.safetensors"]  # older states removed, no temp files
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "run" / "checkpoint" / "state-000005.safetensors"))
    assert {"param/x_T/x", "param/weights/weight", "task/count", "rng/torch"} <= set(t)
    assert any(k.startswith("optim/") and k.endswith("exp_avg_sq") for k in t)
    assert not list((tmp_path / "run").rglob("*.pt")) and not list((tmp_path / "run").rglob("*.tmp-*"))


def test_resume_rejects_other_settings_and_missing_checkpoint(tmp_path):
    with pytest.raises(UserInputError, match="no checkpoint"):
        run(Toy(), _cfg(tmp_path, resume=True))
    run(Toy(), _cfg(tmp_path, iters=2))
    with pytest.raises(UserInputError, match="different settings.*optimizer"):
        run(Toy(optimizer="sgd"), _cfg(tmp_path, resume=True))
    with pytest.raises(UserInputError, match="seed"):
        run(Toy(), _cfg(tmp_path, resume=True, seed=5))
    s = run(Toy(), _cfg(tmp_path, resume=True, iters=4))  # more iterations: allowed
    assert s["iterations"] == 4


@pytest.mark.parametrize("where,match", [("grad", r"parameter group 'x_T' \(tensor 'x'\)"),
                                         ("loss", "the loss is inf"),
                                         ("weights", r"parameter group 'weights' \(tensor 'weight'\)")])
def test_nonfinite_stops_with_last_good_state(tmp_path, where, match):
    task = Toy(nan_at=3, nan_where=where)
    with pytest.raises(NonFiniteError, match=rf"iteration 3: .*{match}.*stopped, the last good state \(iteration 3\)"):
        run(task, _cfg(tmp_path))
    meta = json.loads((tmp_path / "run" / "checkpoint" / "checkpoint.json").read_text())
    assert meta["iteration"] == 3
    # the saved state is the state before the bad step: it equals an uninterrupted run's state after 3 steps
    ref = Toy()
    run(ref, _cfg(tmp_path, "ref", iters=3))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "checkpoint" / meta["tensors"]))
    assert torch.equal(saved["param/x_T/x"], ref.x.detach())
    assert torch.isfinite(saved["param/weights/weight"]).all()


def test_nonfinite_skip_drops_the_step(tmp_path):
    s = run(Toy(nan_at=2, nan_where="grad"), _cfg(tmp_path, on_nonfinite="skip"))
    assert s["iterations"] == 6 and [k["iteration"] for k in s["skipped_steps"]] == [2]
    assert s["skipped_steps"][0]["group"] == "x_T"
    assert s["loss"]["last"] < s["loss"]["first"]


def test_budget_stops_before_exceeding(tmp_path):
    s = run(Toy(), _cfg(tmp_path, iters=100, budget=9))
    assert s["stopped_by"] == "budget" and s["model_calls"]["total"] == 8 and s["iterations"] == 4


def test_unwritable_out_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserInputError, match="cannot write to --out"):
        run(Toy(), LoopConfig(out=blocker / "sub", iters=1, progress=False))
