"""The commands' defaults are the recipes behind the README's figures: ``adjointdpm guide --target-class 9``
with no other option runs the reproduce preset that measured it, and so do audit, stylize and invert (their
options, and on the embedded model the preset's guidance scale). Each default is written once, in the
application's ``Options``; these tests check that the command line and reproduce take them from there and
that they are the documented recipe."""
from __future__ import annotations

import dataclasses
import inspect

import pytest

from adjointdpm.apps.options import ConsoleOptions, EngineOptions, LoopOptions, OutputOptions, is_option
from adjointdpm.apps.registry import APPLICATIONS
from adjointdpm.apps.reproduce import SCALES
from adjointdpm.commands.applications import application_command

# the recipes of docs/results.md, as measured (written out here so that a changed default fails a test)
RECIPES = {
    "guide": dict(n=16, lr=0.1, optimizer="normalized", views=8, view_noise=0.3, stop_loss=0.1, iters=20,
                  manifold_weight=0.1, manifold_threshold=6.0, typicality_weight=0.0),
    "audit": dict(n=100, eps=0.2, step_size=0.05, iters=6),
    "stylize": dict(reference="outline", lora_rank=4, lr=3e-3, content_weight=1.0, n_train=16, batch=8, n_eval=32,
                    iters=10),
    "invert": dict(effect="thicken", n_train=8, n_heldout=8, lr=0.1, iters=10),
}


def _defaults(command) -> dict:
    return {name: getattr(p.default, "default", p.default) for name, p in inspect.signature(command).parameters.items()}


@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_command_options_are_the_options_fields(name):
    """Every field of the application's Options and of the shared groups is one option of its command, with the
    field's default, flags and help; nothing else is."""
    app = APPLICATIONS[name]
    params = inspect.signature(application_command(app)).parameters
    fields = [f for cls in (OutputOptions, app.options, EngineOptions, LoopOptions, ConsoleOptions)
              for f in dataclasses.fields(cls) if is_option(f)]
    assert list(params) == [f.name for f in fields]
    for f in fields:
        option = params[f.name].default
        assert (option.default, option.param_decls, option.help) == (f.default, f.metadata["flags"], f.metadata["help"])


@pytest.mark.parametrize("command", list(RECIPES))
def test_command_defaults_are_the_reproduce_preset(command):
    defaults = _defaults(application_command(APPLICATIONS[command]))
    preset = getattr(SCALES["full"], command)
    recipe = dict(RECIPES[command])
    assert {k: getattr(preset, k) for k in recipe if k not in ("views", "stop_loss")} == \
        {k: v for k, v in recipe.items() if k not in ("views", "stop_loss")}
    if command == "stylize":
        assert recipe.pop("reference") == "outline" and defaults["reference"] is None  # None: outline on the digits model
        assert dataclasses.replace(preset, reference=None) == APPLICATIONS[command].options()
    else:
        assert preset == APPLICATIONS[command].options()  # the full preset is the command's defaults, unchanged
    if command == "guide":  # None: the target's own, which on the digits model is the recipe's
        from adjointdpm.embedded.digit_objectives import DigitTarget

        assert defaults["views"] is None and defaults["stop_loss"] is None
        defaults.update(views=DigitTarget.default_views, stop_loss=DigitTarget.default_stop_loss)
    mismatched = {k: (defaults.get(k), v) for k, v in recipe.items() if defaults.get(k) != v}
    assert not mismatched, mismatched


def test_guide_defaults_reach_the_task_and_the_model_sampler():
    """Nothing between the command line and the task changes the recipe; the sampler is the embedded model's
    (the preset's 20 dpmpp2m steps)."""
    from adjointdpm.apps import guide
    from adjointdpm.apps.session import Session
    from adjointdpm.components import load_components
    from adjointdpm.embedded.digit_objectives import DigitTarget

    opts, recipe = guide.Options(), dict(RECIPES["guide"])
    assert {k: getattr(opts, k) for k in recipe} == {**recipe, "views": None, "stop_loss": None}
    assert (DigitTarget.default_views, DigitTarget.default_stop_loss) == (recipe["views"], recipe["stop_loss"])
    task = guide.build(Session(EngineOptions()), opts)
    settings = task.describe()
    assert {k: settings[k] for k in recipe if k != "iters"} == {k: v for k, v in recipe.items() if k != "iters"}
    model = load_components().settings
    assert (model["default_steps"], model["default_solver"]) == (SCALES["full"].steps, SCALES["full"].solver)
    assert (settings["steps"], settings["solver"]) == (SCALES["full"].steps, SCALES["full"].solver)


def test_guidance_is_the_preset_on_the_embedded_model_only():
    from adjointdpm.apps.launch import recipe_engine

    def guidance(command, model, scale):
        return recipe_engine(APPLICATIONS[command], EngineOptions(model=model, guidance_scale=scale)).guidance_scale

    for command in ("guide", "audit", "stylize", "invert"):
        assert guidance(command, None, None) == SCALES["full"].guidance.get(command)  # None: the model's (4)
        assert guidance(command, "/data/sd", None) is None and guidance(command, None, 2.5) == 2.5
    assert [guidance(c, None, None) for c in ("audit", "stylize", "invert")] == [1.0, 1.0, 1.0]
    assert SCALES["tiny"].guidance == SCALES["full"].guidance == {"audit": 1.0, "stylize": 1.0, "invert": 1.0}
