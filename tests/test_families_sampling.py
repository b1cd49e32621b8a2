"""Each family's sampling setup (schedule, grid, guidance, negative cond) is the one the applications used
to build for it by hand: SD 1.x/2.x and the embedded model sample the VP path of ``alphas_cumprod`` at N
uniform times with the empty prompt's hidden states; the other families their folder's scheduler, grid
and guidance (Flux: its guidance input as an ``encode_prompt`` keyword) — equal values, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import adjointdpm as adpm
from _tiny_families import build_tiny_flux, build_tiny_sdxl
from adjointdpm.components import load_components
from adjointdpm.conditioning import map_floating

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def by_hand(comps, steps: int, w: float):
    """The per-family branch as the applications' session wrote it: (schedule, timesteps, w, kwargs, uncond)."""
    if comps.family == "sd":
        schedule = adpm.VPSchedule.from_alphas_cumprod(comps.alphas_cumprod)
        with torch.no_grad():
            uncond = map_floating(torch.Tensor.detach, comps.encode_prompt([""])) if w != 1.0 else None
        return schedule, schedule.default_timesteps(steps), float(w), {}, uncond
    cfg, kwargs = comps.family_spec.guidance(comps, float(w), None)
    timesteps = comps.scheduler_timesteps(steps).detach().cpu().double().numpy()
    uncond = comps.negative_cond(1, **kwargs) if float(cfg) != 1.0 else None
    return comps.scheduler, timesteps, float(cfg), kwargs, uncond


def assert_same_tree(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and not a.requires_grad
    else:
        assert a == b


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"embedded": None, "sdxl": build_tiny_sdxl(root / "sdxl"), "flux": build_tiny_flux(root / "flux")}


@pytest.mark.parametrize("name, steps, w", [("embedded", 4, 2.5), ("embedded", 1, 1.0), ("sdxl", 3, 5.0),
                                            ("sdxl", 2, 1.0), ("flux", 3, 3.5)])
def test_sampling_setup_is_the_per_family_branch(folders, name, steps, w):
    comps = load_components(folders[name])
    schedule, timesteps, cfg, kwargs, uncond = by_hand(comps, steps, w)
    setup = comps.family_spec.sampling_setup(comps, steps, w)
    if comps.family == "sd":
        assert isinstance(setup.schedule, adpm.VPSchedule)
        np.testing.assert_array_equal(setup.schedule.alpha(timesteps), schedule.alpha(timesteps))
    else:
        assert setup.schedule is comps.scheduler
    assert setup.timesteps.dtype == np.float64 and len(setup.timesteps) == steps
    np.testing.assert_array_equal(setup.timesteps, timesteps)
    assert (setup.guidance_scale, setup.encode_kwargs) == (cfg, kwargs)
    assert (setup.uncond is None) == (uncond is None) == (cfg == 1.0)
    if uncond is not None:
        assert_same_tree(setup.uncond, uncond)
    if name == "flux":  # a guidance-distilled Flux: w is its guidance input, classifier-free guidance is off
        assert kwargs == {"guidance_scale": 3.5} and cfg == 1.0
    assert comps.family_spec.sampling_setup(comps, steps, w, with_uncond=False).uncond is None


def test_an_sd_negative_cond_is_one_row_shared_by_the_batch():
    comps = load_components(None)
    one = comps.family_spec.sampling_uncond(comps, 1, 2.0, {})
    assert torch.equal(comps.family_spec.sampling_uncond(comps, 5, 2.0, {}), one) and one.shape[0] == 1
    assert comps.family_spec.sampling_uncond(comps, 5, 1.0, {}) is None


def test_the_sd_grid_refuses_a_bad_step_count():
    comps = load_components(None)
    with pytest.raises(ValueError, match="steps must be an integer"):
        comps.family_spec.sampling_setup(comps, 0, 2.0)
