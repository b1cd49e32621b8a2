"""``--reward`` / ``--judge-reward`` SPECs: the weight syntax, every kind recognised, the weighted sum equal to
Σ w_i r_i, and each malformed SPEC one line naming the fix (before anything is loaded)."""
from __future__ import annotations

import pytest
import torch

from adjointdpm.critics.errors import CriticError
from adjointdpm.rewards import RewardSum, load_judge, load_rewards, parse_reward_spec

PLUGIN = """
import torch

def brightness(images, *, prompts, fields):
    return images.mean(dim=(1, 2, 3))

def contrast(images):
    return images.std(dim=(1, 2, 3))

def frozen(images):
    return images.detach().mean(dim=(1, 2, 3))
"""


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(PLUGIN)
    return path


@pytest.mark.parametrize("spec, weight, kind, target", [
    ("clip:/m/clip", 1.0, "clip", "/m/clip"),
    ("0.5*pickscore:/m/pick", 0.5, "pickscore", "/m/pick"),
    ("-2e-1 * aesthetic:/m/a", -0.2, "aesthetic", "/m/a"),
    ("hpsv2:/m/hps", 1.0, "hpsv2", "/m/hps"),
    ("3*classifier:/m/cls", 3.0, "classifier", "/m/cls"),
    ("rewards.py:score", 1.0, "plugin", "rewards.py:score"),
    ("some/dir/r.py:score", 1.0, "plugin", "some/dir/r.py:score"),
    ("mypkg.scoring:aesthetic", 1.0, "plugin", "mypkg.scoring:aesthetic"),
    (".5*json:dumps", 0.5, "plugin", "json:dumps"),  # an importable top-level module
])
def test_spec_syntax(spec, weight, kind, target):
    parsed = parse_reward_spec(spec)
    assert (parsed.weight, parsed.kind, parsed.target) == (pytest.approx(weight), kind, target)


def test_added_kinds():
    """A caller's kinds (the application adds the digits model's) parse with or without a target."""
    kinds = {"digits-guide": None, "digits-judge": None}
    for spec, weight, kind, target in [("digits-guide", 1.0, "digits-guide", ""),
                                       ("2*digits-judge:/m/digits", 2.0, "digits-judge", "/m/digits")]:
        parsed = parse_reward_spec(spec, kinds=kinds)
        assert (parsed.weight, parsed.kind, parsed.target) == (pytest.approx(weight), kind, target)
    with pytest.raises(CriticError, match="digits-guide or digits-judge"):
        parse_reward_spec("nope:/m", kinds=kinds)


@pytest.mark.parametrize("spec, words", [
    ("imagereward:/m", "unknown reward kind 'imagereward'"),
    ("clip", "no ':'"),
    ("clip:", "name the folder"),
    ("0*clip:/m", "finite non-zero"),
    ("half*clip:/m", "number before '*'"),
    ("", "empty"),
    ("r.py:not-a-name", "FILE.py:FUNC"),
])
def test_bad_specs_are_one_line(spec, words):
    with pytest.raises(CriticError) as err:
        parse_reward_spec(spec)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_weighted_sum_of_plugins(plugin_file):
    total = load_rewards([f"{plugin_file}:brightness", f"-0.5*{plugin_file}:contrast"])
    assert isinstance(total, RewardSum) and total.weights == [1.0, -0.5]
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    r, terms = total.terms(x, ["a", "b", "c"], None)
    expected = x.mean(dim=(1, 2, 3)) - 0.5 * x.std(dim=(1, 2, 3))
    torch.testing.assert_close(r, expected)
    torch.testing.assert_close(total(x, ["a", "b", "c"]), expected)
    assert set(terms) == {f"{plugin_file}:brightness", f"{plugin_file}:contrast"}
    d = total.describe()
    assert d["kind"] == "sum" and [t["weight"] for t in d["terms"]] == [1.0, -0.5]
    assert total.features(x) is None  # plug-ins have no features


def test_same_spec_twice_is_two_terms(plugin_file):
    total = load_rewards([f"{plugin_file}:brightness", f"2*{plugin_file}:brightness"])
    x = torch.rand(2, 3, 4, 4)
    r, terms = total.terms(x, ["a", "b"])
    assert list(terms) == [f"{plugin_file}:brightness", f"{plugin_file}:brightness#2"]
    torch.testing.assert_close(r, 3 * x.mean(dim=(1, 2, 3)))


def test_sum_checks_batch_inputs(plugin_file):
    total = load_rewards(f"{plugin_file}:brightness")
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(CriticError, match="1 prompts for 2 images"):
        total(x, ["only one"])
    with pytest.raises(CriticError, match="one dict of prompt fields per image"):
        total(x, ["a", "b"], [{}])


def test_no_reward_is_an_error():
    with pytest.raises(CriticError, match="at least one"):
        load_rewards([])


def test_judge_takes_no_weight_and_need_not_be_differentiable(plugin_file):
    with pytest.raises(CriticError, match="takes no weight"):
        load_judge(f"2*{plugin_file}:brightness")
    judge = load_judge(f"{plugin_file}:frozen")
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    torch.testing.assert_close(judge(x, ["a", "b"]), x.detach().mean(dim=(1, 2, 3)))
    with pytest.raises(CriticError, match="no gradient reaches the images"):
        load_rewards(f"{plugin_file}:frozen")(x, ["a", "b"])


def test_missing_folders_name_the_option(tmp_path):
    with pytest.raises(CriticError, match=r"--reward clip: .*does not exist"):
        load_rewards(f"clip:{tmp_path / 'nowhere'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CriticError, match=r"no \.safetensors weights; found only pytorch_model\.bin"):
        load_rewards(f"pickscore:{empty}")
    with pytest.raises(CriticError, match="--judge-reward classifier:"):
        load_judge(f"classifier:{empty}")
