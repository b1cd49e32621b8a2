"""Reward fine-tuning of a diffusion model's weights, at the library level: six methods behind one interface.

    import adjointdpm.finetuning as aft
    method = aft.parse_method("truncated:k=2")           # or "exact", "alignprop", "onestep", "adjoint",
    method.check_sampler(solver, eta)                    #    "adjoint-matching:reward_scale=100"
    method.prepare(network)                              # before the first update (Adjoint Matching's base)
    for batch in batches:
        rollout = aft.Rollout(network, x_T, schedule=scheduler, timesteps=scheduler.timesteps, cond=emb,
                              uncond=null_emb, guidance_scale=w, solver="ddim")
        optimizer.zero_grad()
        report = method.backward(rollout, reward, generator)   # adds ∇θ of the method's loss to p.grad
        optimizer.step()

``reward(x_0) -> (B,)`` is maximised; the network's parameters with ``requires_grad`` (full weights or
peft LoRA adapters) are trained. This package imports the engine only (no application).
"""

from .adjoint_matching import AdjointMatchingMethod
from .base_model import BaseModel
from .counting import CallCounter
from .errors import MethodError
from .lean_adjoint import lean_adjoint
from .memoryless import MemorylessChain
from .method import Method, MethodBase
from .onestep import OneStepMethod
from .parse import METHODS, parse_method
from .rollout import Reward, Rollout, StepReport
from .through_sampler import AlignPropMethod, ContinuousAdjointMethod, ExactMethod, TruncatedMethod

__all__ = ["AdjointMatchingMethod", "AlignPropMethod", "BaseModel", "CallCounter", "ContinuousAdjointMethod",
           "ExactMethod", "METHODS", "MemorylessChain", "Method", "MethodBase", "MethodError", "OneStepMethod",
           "Reward", "Rollout", "StepReport", "TruncatedMethod", "lean_adjoint", "parse_method"]
