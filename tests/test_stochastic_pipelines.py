"""A diffusers pipeline run with ``generator=`` is reproduced exactly: x_T drawn as ``prepare_latents`` draws
it, then ``adpm.diffusers_draws`` for every ``scheduler.step``'s draw, and ``adpm.sample`` gives the pipeline's
latents (float32, tiny random Stable Diffusion folder), for each stochastic scheduler; its gradients are
then those of that very run."""
from __future__ import annotations

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       LCMScheduler, StableDiffusionPipeline)

import adjointdpm as adpm
from _tiny_sd import build_tiny_sd

# name -> (scheduler class and options, solver, eta)
SCHEDULERS = {
    "ddpm": (DDPMScheduler, dict(clip_sample=False), "ddpm", 0.0),
    "ddim_eta1": (DDIMScheduler, dict(clip_sample=False), "ddim", 1.0),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}, "euler_ancestral", 0.0),
    "dpmpp2m_sde": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"), "dpmpp2m_sde", 0.0),
    "lcm": (LCMScheduler, dict(clip_sample=False), "lcm", 0.0),
}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = build_tiny_sd(tmp_path_factory.mktemp("sd"))
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_a_pipeline_run_with_a_generator_is_reproduced(pipe, name, per_sample):
    cls, options, solver, eta = SCHEDULERS[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)
    prompts, steps, w = ["a small digit", "a digit"], 4, 3.0

    def generator():
        return ([torch.Generator().manual_seed(s) for s in (5, 6)] if per_sample else torch.Generator().manual_seed(5))

    theirs = pipe(prompts, num_inference_steps=steps, guidance_scale=w, eta=eta, generator=generator(),
                  output_type="latent").images
    g = generator()
    shape = (2, 4, 8, 8)
    x_T = (torch.cat([torch.randn((1, *shape[1:]), generator=one) for one in g]) if per_sample
           else torch.randn(shape, generator=g))
    noise = adpm.diffusers_draws(g, pipe.scheduler, x_T, solver=solver, eta=eta)
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    ours = adpm.sample(pipe.unet, x_T, schedule=pipe.scheduler, timesteps=pipe.scheduler.timesteps, cond=cond,
                       uncond=uncond, guidance_scale=w, solver=solver, eta=eta, noise=noise, grad=None)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    other = adpm.sample(pipe.unet, x_T, schedule=pipe.scheduler, timesteps=pipe.scheduler.timesteps, cond=cond,
                        uncond=uncond, guidance_scale=w, solver=solver, eta=eta, noise=noise.roll(1, dims=1), grad=None)
    assert (other - theirs).abs().max() > 1e-2  # the draws matter: the comparison bites


def test_the_draws_and_bad_input():
    like = torch.zeros(2, 3)
    sched = DDPMScheduler(clip_sample=False)
    sched.set_timesteps(4)
    assert float(sched.timesteps[-1]) == 0
    draws = adpm.diffusers_draws(torch.Generator().manual_seed(1), sched, like, solver="ddpm")
    g = torch.Generator().manual_seed(1)
    expected = torch.stack([torch.randn(2, 3, generator=g) for _ in range(3)])
    assert torch.equal(draws[:3], expected) and torch.equal(draws[3], torch.zeros(2, 3))  # no draw at t = 0
    with pytest.raises(ValueError, match="deterministic and draws no noise"):
        adpm.diffusers_draws(torch.Generator(), sched, like, solver="ddim")
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        adpm.diffusers_draws([torch.Generator()] * 3, sched, like, solver="ddpm")


def test_a_flow_pipeline_run_with_a_generator_is_reproduced(tmp_path):
    """SD3 with FlowMatchEuler's stochastic_sampling (solver 'lcm' on a flow grid: a draw at every step) and
    with SDE-DPM-Solver++ on flow sigmas; its steps draw from torch's global generator (generator=None)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from _tiny_families import build_tiny_sd3

    pipe = StableDiffusion3Pipeline.from_pretrained(str(build_tiny_sd3(tmp_path / "sd3", with_t5=False)),
                                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config
    for scheduler, solver in (
            (FlowMatchEulerDiscreteScheduler.from_config(config, stochastic_sampling=True), "lcm"),
            (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", use_flow_sigmas=True, prediction_type="flow_prediction",
                                         flow_shift=config.shift), "dpmpp2m_sde")):
        pipe.scheduler = scheduler
        prompt, w = ["a small digit"], 2.0
        torch.manual_seed(7)  # (the SD3 pipeline does not hand its generator to scheduler.step: global draws)
        theirs = pipe(prompt, num_inference_steps=3, guidance_scale=w, generator=torch.Generator().manual_seed(2),
                      output_type="latent", height=16, width=16).images
        x_T = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(2))
        torch.manual_seed(7)
        noise = adpm.diffusers_draws(None, pipe.scheduler, x_T, solver=solver)
        pe, ne, pooled, neg_pooled = pipe.encode_prompt(prompt, prompt, None, device="cpu")
        ours = adpm.sample(pipe.transformer, x_T, schedule=pipe.scheduler, timesteps=pipe.scheduler.timesteps,
                           cond={"encoder_hidden_states": pe, "pooled_projections": pooled},
                           uncond={"encoder_hidden_states": ne, "pooled_projections": neg_pooled},
                           guidance_scale=w, solver=solver, noise=noise, grad=None)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=solver)
        assert noise[-1].abs().max() > 0 if solver == "lcm" else True  # FlowMatchEuler draws at the last step too
