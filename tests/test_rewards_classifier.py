"""``classifier:`` and ``digits-guide`` / ``digits-judge`` rewards: log p(class named by the prompt's field
``class``, by index or label name) from the model's own logits, gradients reaching the pixels, features for
diversity, and one-line errors for a missing field, an unknown label or a non-digit class."""
from __future__ import annotations

import json

import pytest
import torch

from _tiny_critics import build_classifier
from adjointdpm.critics.errors import CriticError
from adjointdpm.rewards import load_judge, load_rewards


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_classifier(tmp_path_factory.mktemp("rewards") / "cls")


def test_log_probability_of_the_named_class(folder):
    reward = load_rewards(f"classifier:{folder}").rewards[0]
    x = torch.rand(3, 3, 20, 20) * 2 - 1
    fields = [{"class": "dog"}, {"class": 2}, {"class": "0"}]  # a label name, an index, an index as text
    with torch.no_grad():
        logits = reward.classifier(x)  # the critics' classifier: the model's logits through its preprocessing
        logp = torch.log_softmax(logits, -1)
        torch.testing.assert_close(reward(x, ["a", "b", "c"], fields), torch.stack([logp[0, 1], logp[1, 2], logp[2, 0]]))
        assert reward.features(x).shape == (3, 16)  # the last stage's channels, averaged over positions
    json.dumps(reward.describe())
    x.requires_grad_(True)
    reward(x, ["a", "b", "c"], fields).sum().backward()
    assert (x.grad.abs().sum(dim=(1, 2, 3)) > 0).all()


@pytest.mark.parametrize("fields, words", [
    ([{}, {"class": 1}], "needs each prompt's field 'class'"),
    ([{"class": "zebra"}, {"class": 1}], "has no class named 'zebra'"),
    ([{"class": 7}, {"class": 1}], "class 7 is out of range"),
])
def test_bad_classes_are_one_line(folder, fields, words):
    with pytest.raises(CriticError, match=words) as err:
        load_rewards(f"classifier:{folder}")(torch.zeros(2, 3, 16, 16), ["p", "q"], fields)
    assert "\n" not in str(err.value)


def test_digits_guide_and_judge():
    from adjointdpm.embedded.critics import load_critics

    from adjointdpm.embedded.rewards import DIGIT_REWARDS

    critics = load_critics()
    guide = load_rewards("digits-guide", kinds=DIGIT_REWARDS).rewards[0]
    judge = load_judge("digits-judge", kinds=DIGIT_REWARDS)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    fields = [{"class": d} for d in (0, 3, 8, 9)]
    with torch.no_grad():
        for reward, net in ((guide, critics.guide), (judge, critics.judge)):
            logp = torch.log_softmax(net(x), -1)
            torch.testing.assert_close(reward(x, ["p"] * 4, fields), logp[torch.arange(4), [0, 3, 8, 9]])
            torch.testing.assert_close(reward.features(x), net.features(x))
    assert judge.describe()["kind"] == "digits-judge"
    x.requires_grad_(True)
    guide(x, ["p"] * 4, fields).sum().backward()
    assert (x.grad.abs().sum(dim=(1, 2, 3)) > 0).all()
    with pytest.raises(CriticError, match="must be a digit 0..9, got 'cat'"):
        guide(x, ["p"] * 4, [{"class": "cat"}] * 4)
    torch.testing.assert_close(judge.accuracy(x, ["p"] * 4, fields),
                               (critics.judge(x).argmax(-1) == torch.tensor([0, 3, 8, 9])).float())
    with pytest.raises(CriticError, match="digits-guide"):
        load_rewards("digits-guide:/no/such/model", kinds=DIGIT_REWARDS)
    with pytest.raises(CriticError, match="unknown reward kind|no ':'"):  # the rewards package alone has no digits
        load_rewards("digits-guide:x")
