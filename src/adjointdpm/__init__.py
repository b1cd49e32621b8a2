"""adjointdpm: gradients of any loss on diffusion samples with respect to the initial noise, the
conditioning and the network weights, in memory that does not grow with the number of sampling steps.

    import adjointdpm as adpm
    scheduler.set_timesteps(25)
    x0 = adpm.sample(unet, x_T, schedule=scheduler, timesteps=scheduler.timesteps,
                     cond=emb, uncond=null_emb, guidance_scale=7.5, solver="dpmpp2m", grad="exact")
    loss_fn(x0).backward()

x_T is the pipeline's ``latents=``; cond/uncond a tensor or a dict of the network's keyword arguments
(SDXL, SD3, Flux, PixArt, DiT); x_0 is what the pipeline decodes.
"""

from .engine import Sampler, build_sampler, time_grid
from .gradients import Adjoint, Backprop, Checkpoint, Exact, GradMode, Reversible, Truncated
from .flow_schedule import FlowMatchingSchedule
from .grid import TimeGrid, grid_from_scheduler, schedule_from_scheduler
from .model import Denoiser
from .sampling import sample
from .schedule import CosineVPSchedule, DiscreteVPSchedule, LinearVPSchedule, NoiseSchedule, VPSchedule
from .solvers import SOLVERS, STOCHASTIC_SOLVER_NAMES
from .stochastic import NoiseSource, SeededNoise, diffusers_draws, noise_tensor, sample_streams

__version__ = "0.1.0"

__all__ = [
    "sample",
    "Sampler",
    "build_sampler",
    "time_grid",
    "NoiseSchedule",
    "FlowMatchingSchedule",
    "schedule_from_scheduler",
    "grid_from_scheduler",
    "TimeGrid",
    "VPSchedule",
    "DiscreteVPSchedule",
    "LinearVPSchedule",
    "CosineVPSchedule",
    "Denoiser",
    "GradMode",
    "Adjoint",
    "Exact",
    "Backprop",
    "Checkpoint",
    "Truncated",
    "SOLVERS",
    "STOCHASTIC_SOLVER_NAMES",
    "NoiseSource",
    "SeededNoise",
    "diffusers_draws",
    "noise_tensor",
    "sample_streams",
]
