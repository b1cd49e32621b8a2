"""The stochastic samplers' test cases (no tests here): each case a tiny family network, a configured
diffusers scheduler, the engine's solver and η, and how its diffusers loop is given our injected noises
(``variance_noise=noise[i]`` where ``step`` takes it — DDIMScheduler, DPMSolverMultistepScheduler —
elsewhere the scheduler module's ``randn_tensor`` monkeypatched to return noise[i] at step i)."""

import importlib

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, LCMScheduler)

import adjointdpm as adpm
from _contracts import Problem
from _tiny_networks import FAMILIES
from adjointdpm.conditioning import floating_leaves, map_floating
from conftest import SD_BETAS


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _sched(cls, n, **kw):
    s = cls(**kw)
    s.set_timesteps(n)
    return s


# name -> (family, scheduler factory, solver, eta, how the loop injects the noise)
CASES = {
    "ddpm": ("sdxl", lambda n: _sched(DDPMScheduler, n, **SD_BETAS, clip_sample=False), "ddpm", 0.0, "patch"),
    "ddpm_large": ("sdxl", lambda n: _sched(DDPMScheduler, n, **SD_BETAS, clip_sample=False, variance_type="fixed_large",
                                            timestep_spacing="trailing"), "ddpm", 0.0, "patch"),
    "ddim_eta1": ("sdxl", lambda n: _sched(DDIMScheduler, n, **SD_BETAS, clip_sample=False, set_alpha_to_one=False,
                                           steps_offset=1), "ddim", 1.0, "variance_noise"),
    "ddim_eta05": ("sdxl", lambda n: _sched(DDIMScheduler, n, **SD_BETAS, clip_sample=False), "ddim", 0.5,
                   "variance_noise"),
    "euler_ancestral": ("sdxl", lambda n: _sched(EulerAncestralDiscreteScheduler, n, **SD_BETAS), "euler_ancestral",
                        0.0, "patch"),
    "euler_ancestral_trailing": ("sdxl", lambda n: _sched(EulerAncestralDiscreteScheduler, n, **SD_BETAS,
                                                          timestep_spacing="trailing"), "euler_ancestral", 0.0, "patch"),
    "dpmpp2m_sde": ("sdxl", lambda n: _sched(DPMSolverMultistepScheduler, n, **SD_BETAS,
                                             algorithm_type="sde-dpmsolver++"), "dpmpp2m_sde", 0.0, "variance_noise"),
    "dpmpp2m_sde_karras_heun": ("sdxl", lambda n: _sched(DPMSolverMultistepScheduler, n, **SD_BETAS,
                                                         algorithm_type="sde-dpmsolver++", use_karras_sigmas=True,
                                                         solver_type="heun"), "dpmpp2m_sde", 0.0, "variance_noise"),
    "lcm": ("sdxl", lambda n: _sched(LCMScheduler, n, **SD_BETAS), "lcm", 0.0, "patch"),
    # a small timestep_scaling makes the boundary condition c_skip x + c_out x̂₀ visible (c_skip ≈ 0 at 10)
    "lcm_boundary": ("sdxl", lambda n: _sched(LCMScheduler, n, **SD_BETAS, timestep_scaling=0.002), "lcm", 0.0,
                     "patch"),
    "flow_dpmpp2m_sde": ("sd3", lambda n: _sched(DPMSolverMultistepScheduler, n, use_flow_sigmas=True,
                                                 prediction_type="flow_prediction", flow_shift=3.0,
                                                 algorithm_type="sde-dpmsolver++"), "dpmpp2m_sde", 0.0, "variance_noise"),
    "flow_stochastic_euler": ("sd3", lambda n: _sched(FlowMatchEulerDiscreteScheduler, n, shift=3.0,
                                                      stochastic_sampling=True), "lcm", 0.0, "patch"),
}
#: the module whose randn_tensor a scheduler draws with
MODULES = {DDPMScheduler: "scheduling_ddpm", EulerAncestralDiscreteScheduler: "scheduling_euler_ancestral_discrete",
           LCMScheduler: "scheduling_lcm", FlowMatchEulerDiscreteScheduler: "scheduling_flow_match_euler_discrete"}


def _setup(name, batch=2, seed=1):
    family = FAMILIES[name]
    net = family.network()
    x, cond, uncond = family.inputs(torch.Generator().manual_seed(seed), batch)
    return family, net, x, cond, uncond


def _noise(steps, x, seed=9):
    return torch.randn(steps, *x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))


def _diffusers_loop(monkeypatch, family, net, scheduler, x_T, cond, uncond, noise, eta, how):
    """The pipeline loop with noise[i] injected at step i (see the module docstring)."""
    current = {"i": 0}
    if how == "patch":
        module = importlib.import_module(f"diffusers.schedulers.{MODULES[type(scheduler)]}")
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: noise[current["i"]].clone())
    x = x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            current["i"] = i
            x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            out = family.call(net, x_in, t, cond, uncond, family.guidance)
            extra = {}
            if how == "variance_noise":
                extra["variance_noise"] = noise[i]
            if isinstance(scheduler, DDIMScheduler):
                extra["eta"] = eta
            x = scheduler.step(out, t, x, **extra).prev_sample
    return x


def _sample(family, net, x, cond, uncond, scheduler, solver, eta, noise, grad):
    w = family.guidance
    return adpm.sample(net, x, schedule=scheduler, timesteps=scheduler.timesteps, cond=cond,
                       uncond=uncond if w != 1 else None, guidance_scale=w, solver=solver, eta=eta, noise=noise,
                       grad=grad)


def _gradients(family, net, x, cond, uncond, scheduler, solver, eta, noise, grad, weight):
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    noise = noise.clone().requires_grad_()
    cond = map_floating(lambda t: t.clone().requires_grad_(), cond)
    uncond = map_floating(lambda t: t.clone().requires_grad_(), uncond)
    x0 = _sample(family, net, x, cond, uncond, scheduler, solver, eta, noise, grad)
    (x0 * weight).sum().backward()
    leaves = [x, noise, *floating_leaves(cond)] + (floating_leaves(uncond) if family.guidance != 1 else [])
    grads = [leaf.grad for leaf in leaves]
    grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    return grads


def stochastic_problem(case: str, steps: int = 3) -> Problem:
    """Gradients of ⟨w, x_0⟩ for x_T, the injected noises, every conditioning tensor and the weights."""
    name, make, solver, eta, _ = CASES[case]
    family, net, x, cond, uncond = _setup(name)
    noise = _noise(steps, x)
    weight = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(3))

    def gradients(mode):
        grads = _gradients(family, net, x, cond, uncond, make(steps), solver, eta, noise, mode, weight)
        return {f"input {i}": g for i, g in enumerate(grads)}

    def every_input_reached(ref):
        assert all(g is not None for g in ref.values())
        assert ref["input 1"][: steps - 1].abs().sum() > 0, "the injected noises reach the sample"

    return Problem(gradients, every_input_reached)


GRAD_CASES = ["ddpm", "ddim_eta05", "euler_ancestral", "dpmpp2m_sde", "lcm_boundary", "flow_dpmpp2m_sde", "flow_stochastic_euler"]
