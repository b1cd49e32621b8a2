"""Judge helpers: diversity = mean pairwise distance of features per prompt (known values, collapse → 0), the
reward-hacking alarm (rings when the optimised reward rises while the judge's falls from its peak, silent
otherwise and for noise below the tolerance), and a judge evaluated without gradients."""
from __future__ import annotations

import math

import pytest
import torch

from adjointdpm.critics.errors import CriticError
from adjointdpm.rewards import diversity, group_by_prompt, hacking_alarm, judge_evaluation, load_judge


def test_diversity_known_values():
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 4 sides 1, 2 diagonals √2
    line = torch.tensor([[0.0], [3.0]])
    collapsed = torch.ones(5, 7)
    out = diversity({"square": square, "line": line, "collapsed": collapsed})
    assert out["per_prompt"]["square"] == pytest.approx((4 + 2 * math.sqrt(2)) / 6)
    assert out["per_prompt"]["line"] == pytest.approx(3.0)
    assert out["per_prompt"]["collapsed"] == pytest.approx(0.0, abs=1e-12)
    assert out["mean"] == pytest.approx(sum(out["per_prompt"].values()) / 3)
    with pytest.raises(CriticError, match="at least 2 images per prompt"):
        diversity({"one": torch.zeros(1, 3)})
    with pytest.raises(CriticError, match="at least one prompt"):
        diversity({})


def test_group_by_prompt_keeps_rows():
    f = torch.arange(10.0).view(5, 2)
    groups = group_by_prompt(f, ["a", "b", "a", "c", "b"])
    assert list(groups) == ["a", "b", "c"]
    torch.testing.assert_close(groups["a"], f[[0, 2]])
    torch.testing.assert_close(groups["b"], f[[1, 4]])


@pytest.mark.parametrize("optimised, judge, rings", [
    ([1.0, 2.0, 3.0], [0.5, 0.4, 0.3], True),           # reward up, judge down from the start
    ([1.0, 2.0, 3.0, 4.0], [0.5, 0.7, 0.6, 0.55], True),  # judge peaked at point 1, fell since, reward kept rising
    ([1.0, 2.0, 3.0], [0.5, 0.6, 0.7], False),          # both rise: fine-tuning works
    ([1.0, 0.9, 0.8], [0.5, 0.4, 0.3], False),          # both fall: a bad run, not hacking
    ([1.0, 2.0, 3.0], [0.5, 0.499, 0.498], False),      # the judge within 1 % of its peak: noise
    ([1.0], [0.5], False),                              # one point: nothing to compare
])
def test_hacking_alarm(optimised, judge, rings):
    message = hacking_alarm(optimised, judge, optimised_name="pickscore", judge_name="the aesthetic judge")
    assert (message is not None) == rings
    if rings:
        assert "pickscore rose" in message and "the aesthetic judge fell" in message and "\n" not in message


def test_hacking_alarm_tolerance_and_lengths():
    assert hacking_alarm([0, 1], [1.0, 0.9], tolerance=0.2) is None
    assert hacking_alarm([0, 1], [1.0, 0.9], tolerance=0.05) is not None
    with pytest.raises(CriticError, match="one judge value per evaluation point"):
        hacking_alarm([0, 1, 2], [1.0, 0.9])


def test_judge_evaluation_has_no_gradient(tmp_path):
    (tmp_path / "j.py").write_text("def judge(images):\n    return images.mean(dim=(1, 2, 3))\n")
    judge = load_judge(f"{tmp_path / 'j.py'}:judge")
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    scores, features = judge_evaluation(judge, x, ["a", "b"])
    assert not scores.requires_grad and features is None
    torch.testing.assert_close(scores, x.detach().mean(dim=(1, 2, 3)))
