"""An SD-1.5-style folder (PNDMScheduler with skip_prk_steps, steps_offset 1, set_alpha_to_one False) sampled
with the defaults is the user's own ``StableDiffusionPipeline`` as configured: the same latents for the same
``latents=``, step count and guidance (PLMS on the scheduler's grid, the pipeline's 50 steps and 7.5)."""
from __future__ import annotations

import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, UniPCMultistepScheduler

from _tiny_sd import build_tiny_sd
from adjointdpm.components import load_components

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
SD15_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                      skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
PROMPTS = ["the digit 3", "a handwritten digit 7"]


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    root = build_tiny_sd(tmp_path_factory.mktemp("sd15") / "model")
    PNDMScheduler(**SD15_SCHEDULER).save_pretrained(root / "scheduler")
    return root


def pipeline_latents(root, scheduler=None, **kwargs) -> torch.Tensor:
    pipe = StableDiffusionPipeline.from_pretrained(root, safety_checker=None, requires_safety_checker=False,
                                                   **({} if scheduler is None else {"scheduler": scheduler}))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPTS, output_type="latent", **kwargs).images


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_defaults_are_the_folder_scheduler_and_the_pipeline_call(sd15):
    comps = load_components(sd15)
    assert comps.default_solver() == "pndm"
    assert (comps.settings["default_steps"], comps.settings["default_guidance_scale"]) == (50, 7.5)
    x_T = comps.noise(len(PROMPTS), seed=3)
    ours = comps.generate(PROMPTS, x_T=x_T, decode=False)
    theirs = pipeline_latents(sd15, latents=x_T.clone())
    assert _rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize("steps, w", [(1, 7.5), (2, 1.0), (6, 3.0)])
def test_any_step_count_and_guidance_is_the_pipeline_call(sd15, steps, w):
    comps = load_components(sd15)
    x_T = comps.noise(len(PROMPTS), seed=1)
    ours = comps.generate(PROMPTS, x_T=x_T, steps=steps, guidance_scale=w, decode=False)
    theirs = pipeline_latents(sd15, latents=x_T.clone(), num_inference_steps=steps, guidance_scale=w)
    assert _rel(ours, theirs) <= 1e-5


def test_a_unipc_folder_is_its_pipeline_call(tmp_path):
    root = build_tiny_sd(tmp_path / "model")
    config = {k: v for k, v in SD15_SCHEDULER.items() if k in ("beta_schedule", "beta_start", "beta_end")}
    UniPCMultistepScheduler(**config).save_pretrained(root / "scheduler")
    index = (root / "model_index.json").read_text().replace("PNDMScheduler", "UniPCMultistepScheduler")
    (root / "model_index.json").write_text(index)
    comps = load_components(root)
    assert comps.default_solver() == "unipc"
    x_T = comps.noise(len(PROMPTS), seed=2)
    ours = comps.generate(PROMPTS, x_T=x_T, steps=7, guidance_scale=5.0, decode=False)
    theirs = pipeline_latents(root, latents=x_T.clone(), num_inference_steps=7, guidance_scale=5.0)
    assert _rel(ours, theirs) <= 1e-5


def test_an_outdated_scheduler_config_is_fixed_as_the_pipeline_fixes_it(tmp_path):
    """StableDiffusionPipeline sets steps_offset to 1 (and clip_sample to False) before sampling: so do we."""
    root = build_tiny_sd(tmp_path / "model")  # PNDMScheduler with steps_offset 0
    comps = load_components(root)
    assert comps.scheduler.config.steps_offset == 0
    x_T = comps.noise(len(PROMPTS), seed=4)
    ours = comps.generate(PROMPTS, x_T=x_T, steps=4, guidance_scale=3.0, decode=False)
    assert comps.scheduler.config.steps_offset == 1
    theirs = pipeline_latents(root, latents=x_T.clone(), num_inference_steps=4, guidance_scale=3.0)
    assert _rel(ours, theirs) <= 1e-5


def test_the_applications_session_samples_the_pipeline_call_by_default(sd15):
    """What the commands sample (a Session with no --solver / --steps / --guidance-scale) is the pipeline call."""
    from adjointdpm.apps.options import EngineOptions
    from adjointdpm.apps.session import Session

    session = Session(EngineOptions(model=sd15, grad="exact"))
    assert (session.solver, session.steps, session.guidance_scale) == ("pndm", 50, 7.5)
    x_T = session.noise(len(PROMPTS), seed=7)
    ours = session.sample(x_T, session.encode(PROMPTS), grad=None)
    theirs = pipeline_latents(sd15, latents=x_T.clone())
    assert _rel(ours, theirs) <= 1e-5
