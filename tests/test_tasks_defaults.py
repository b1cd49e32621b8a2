"""The commands' defaults are the recipes behind the README's figures: ``adjointdpm guide --target-class 9``
with no other option runs the reproduce preset that measured it, and so do audit, stylize and invert (their
options, and on the embedded model the preset's guidance scale)."""
from __future__ import annotations

import inspect

import pytest

from adjointdpm.tasks import commands
from adjointdpm.tasks.reproduce import SCALES


def _defaults(command) -> dict:
    return {name: getattr(p.default, "default", p.default) for name, p in inspect.signature(command).parameters.items()}


@pytest.mark.parametrize("command,preset", [("guide", "guide"), ("audit", "audit"), ("stylize", "stylize"),
                                            ("invert", "invert")])
def test_command_defaults_are_the_reproduce_preset(command, preset):
    defaults = _defaults(getattr(commands, command))
    recipe = dict(getattr(SCALES["full"], preset))
    if command == "stylize":
        assert recipe.pop("reference") == "outline" and defaults["reference"] is None  # None: outline on the digits model
    if command == "guide":  # None: the target's own, which on the digits model is the recipe's
        from adjointdpm.embedded.objectives import DigitTarget

        assert defaults["views"] is None and defaults["stop_loss"] is None
        defaults.update(views=DigitTarget.default_views, stop_loss=DigitTarget.default_stop_loss)
    mismatched = {k: (defaults.get(k), v) for k, v in recipe.items() if defaults.get(k) != v}
    assert not mismatched, mismatched


def test_guide_defaults_reach_the_task_and_the_model_sampler():
    """Nothing between the command line and the task changes the recipe; the sampler is the embedded model's
    (the preset's 20 dpmpp2m steps)."""
    from adjointdpm.components import load_components
    from adjointdpm.tasks.guide import GuideOptions

    opts, recipe = GuideOptions(), dict(SCALES["full"].guide)
    recipe.pop("iters")
    assert {k: getattr(opts, k) for k in recipe} == {**recipe, "views": None, "stop_loss": None}
    from adjointdpm.embedded.objectives import DigitTarget

    assert (DigitTarget.default_views, DigitTarget.default_stop_loss) == (recipe["views"], recipe["stop_loss"])
    settings = load_components().settings
    assert (settings["default_steps"], settings["default_solver"]) == (SCALES["full"].steps, SCALES["full"].solver)


def test_guidance_is_the_preset_on_the_embedded_model_only():
    from adjointdpm.tasks.commands import recipe_guidance

    for command in ("guide", "audit", "stylize", "invert"):
        assert recipe_guidance(command, None, None) == SCALES["full"].guidance.get(command)  # None: the model's (4)
        assert recipe_guidance(command, "/data/sd", None) is None and recipe_guidance(command, None, 2.5) == 2.5
    assert [recipe_guidance(c, None, None) for c in ("audit", "stylize", "invert")] == [1.0, 1.0, 1.0]
