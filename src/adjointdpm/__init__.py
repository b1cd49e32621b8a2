"""adjointdpm: gradients of any loss on diffusion samples with respect to the initial noise, the
conditioning and the network weights, in memory that does not grow with the number of sampling steps.

    import adjointdpm as adpm
    x0 = adpm.sample(unet, x_T, schedule=adpm.VPSchedule.from_scheduler(scheduler),
                     timesteps=scheduler.timesteps, cond=emb, uncond=null_emb, guidance_scale=7.5,
                     solver="dpmpp2m", grad="adjoint")
    loss_fn(x0).backward()
"""

from .gradients import Adjoint, Backprop, Checkpoint, Exact, GradMode, Reversible, Truncated
from .model import Denoiser
from .sampling import sample
from .schedule import CosineVPSchedule, DiscreteVPSchedule, LinearVPSchedule, VPSchedule
from .solvers import SOLVERS

__version__ = "0.1.0"

__all__ = [
    "sample",
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
]
