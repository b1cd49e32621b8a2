"""Plug-in rewards ``FILE.py:FUNC`` / ``package.module:FUNC``: the prompts and each prompt's fields reach the
function as far as it accepts them, its gradient reaches the images, and every contract failure (shape,
non-finite, not a tensor, no gradient, an exception) is one line naming the cause."""
from __future__ import annotations

import pytest
import torch

from adjointdpm.critics.errors import CriticError
from adjointdpm.rewards import load_rewards

PLUGIN = """
import torch

def targeted(images, *, prompts, fields):
    # mean of the channel the field names, minus a penalty for prompts saying "dark"
    ch = torch.tensor([f["channel"] for f in fields])
    pen = torch.tensor([1.0 if "dark" in p else 0.0 for p in prompts])
    return images[torch.arange(images.shape[0]), ch].mean(dim=(1, 2)) - pen

def everything(images, **context):
    assert set(context) == {"prompts", "fields"}
    return images.sum(dim=(1, 2, 3)) * 0 + len(context["prompts"])  + images.mean(dim=(1, 2, 3))

def scalar(images):
    return images.mean()

def per_pixel(images):
    return images.mean(dim=1)

def nan(images):
    return images.mean(dim=(1, 2, 3)) / 0 * 0

def numpy_round_trip(images):
    return torch.from_numpy(images.detach().numpy().mean(axis=(1, 2, 3)))

def a_list(images):
    return [1.0] * images.shape[0]

def broken(images):
    raise KeyError("score_head")
"""


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "rewards_file.py"
    p.write_text(PLUGIN)
    return p


def test_prompts_and_fields_reach_the_function_and_gradient_the_images(path):
    reward = load_rewards(f"{path}:targeted")
    x = (torch.rand(2, 3, 4, 4) * 2 - 1).requires_grad_(True)
    r = reward(x, ["a dark cat", "a cat"], [{"channel": 2}, {"channel": 0}])
    torch.testing.assert_close(r, torch.stack([x[0, 2].mean() - 1, x[1, 0].mean()]))
    r.sum().backward()
    assert x.grad[0, 2].abs().sum() > 0 and x.grad[0, :2].abs().sum() == 0
    assert reward.describe()["terms"][0]["function"] == "targeted"


def test_var_keyword_gets_all_context(path):
    x = torch.zeros(3, 3, 2, 2)
    torch.testing.assert_close(load_rewards(f"{path}:everything")(x, ["a", "b", "c"]), torch.full((3,), 3.0))


def test_module_route(tmp_path, monkeypatch):
    pkg = tmp_path / "my_reward_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = load_rewards("my_reward_pkg.scores:targeted")
    r = reward(torch.ones(1, 3, 2, 2), ["x"], [{"channel": 1}])
    torch.testing.assert_close(r, torch.ones(1))


@pytest.mark.parametrize("func, words", [
    ("scalar", r"shape \(\) for 2 images: return one reward per image, shape \(2,\)"),
    ("per_pixel", r"shape \(2, 4, 4\)"),
    ("nan", "non-finite values"),
    ("numpy_round_trip", "no gradient reaches the images"),
    ("a_list", "returned list, not a torch tensor"),
    ("broken", "raised KeyError: 'score_head'"),
    ("missing", "has no function missing"),
])
def test_contract_failures_are_one_line(path, func, words):
    with pytest.raises(CriticError, match=words) as err:
        load_rewards(f"{path}:{func}")(torch.rand(2, 3, 4, 4), ["a", "b"])
    assert "\n" not in str(err.value) and "--reward" in str(err.value)


def test_missing_file_and_module(tmp_path):
    with pytest.raises(CriticError, match="does not exist"):
        load_rewards(f"{tmp_path / 'nope.py'}:f")
    with pytest.raises(CriticError, match="cannot import no_such_pkg_xyz.mod"):
        load_rewards("no_such_pkg_xyz.mod:f")
