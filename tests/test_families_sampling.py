"""Each family's sampling setup (schedule, grid, guidance, negative cond) is the one the applications used
to build for it by hand: every family its folder's scheduler, grid and guidance (Flux: its guidance input
as an ``encode_prompt`` keyword; SD 1.5's PNDMScheduler: its N distinct times), the embedded model its
explicit recipe (its scheduler at N uniform times, the empty prompt's hidden states) — equal values, bit
for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import adjointdpm as adpm
from _tiny_families import build_tiny_flux, build_tiny_sdxl
from _tiny_sd import build_tiny_sd
from adjointdpm.components import load_components
from adjointdpm.conditioning import map_floating

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def by_hand(comps, steps: int, w: float):
    """The per-family branch as the applications' session wrote it: (schedule, timesteps, w, kwargs, uncond)."""
    if comps.family == "sd":
        with torch.no_grad():
            uncond = map_floating(torch.Tensor.detach, comps.encode_prompt([""])) if w != 1.0 else None
        if comps.settings.get("timesteps") == "uniform":
            schedule = adpm.VPSchedule.from_alphas_cumprod(comps.alphas_cumprod)
            return schedule, schedule.default_timesteps(steps), float(w), {}, uncond
        listed = comps.scheduler_timesteps(steps).detach().cpu().double().numpy()
        distinct = np.concatenate([listed[:2], listed[3:]]) if len(listed) > 2 else listed  # PLMS: t1 twice
        return comps.scheduler, distinct, float(w), {}, uncond
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
    return {"embedded": None, "sdxl": build_tiny_sdxl(root / "sdxl"), "flux": build_tiny_flux(root / "flux"),
            "sd15": build_tiny_sd(root / "sd15")}


@pytest.mark.parametrize("name, steps, w", [("embedded", 4, 2.5), ("embedded", 1, 1.0), ("sd15", 4, 7.5),
                                            ("sd15", 1, 2.0), ("sdxl", 3, 5.0),
                                            ("sdxl", 2, 1.0), ("flux", 3, 3.5)])
def test_sampling_setup_is_the_per_family_branch(folders, name, steps, w):
    comps = load_components(folders[name])
    schedule, timesteps, cfg, kwargs, uncond = by_hand(comps, steps, w)
    setup = comps.family_spec.sampling_setup(comps, steps, w)
    if name == "embedded":  # its explicit recipe: the VP path of alphas_cumprod at N uniform times
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
