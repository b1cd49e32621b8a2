"""The methods the benchmarks compare, each as one function ``x_0 = run(setup, solver, steps, grad)``.

Every engine mode goes through ``adjointdpm.sample``. Two references and one peer are built here:

* ``reference``: float64 autograd back-propagation through the sampler loop, with each step wrapped in
  ``torch.utils.checkpoint`` so that N = 100 fits in memory. Checkpointing recomputes the same float64
  operations, so it gives back-propagation's gradient (each run checks this at its smallest N: the
  ``reference_check`` entry of the JSON). For the reversible mode the reference is the same thing through
  the EDICT sampler (EDICT is its own sampler).
* ``odeint_adjoint``: ``torchdiffeq.odeint_adjoint`` on the ρ-ODE dy/dρ = ε̂(α(ρ) y, t(ρ), c) over the
  sampler's ρ grid (the official AdjointDPM code's engine), weights and embeddings as ``adjoint_params``;
  the final jump x_0 = x̂₀(x_{N−1}, t_{N−1}) is differentiated by autograd, as the engine's Adjoint does.
  Its method is Euler for ddim (then its forward pass *is* DDIM) and Heun (``heun2``, two calls a step)
  for dpmpp2m: torchdiffeq has no exponential multistep method, and its fixed-grid Adams–Bashforth
  assumes equal steps (inconsistent on the ρ grid) and starts with RK4.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

import adjointdpm as adpm
from adjointdpm.gradients.base import GradMode
from adjointdpm.gradients.reversible import edict_step

ENGINE_MODES = {
    "backprop": lambda: "backprop",
    "checkpoint": lambda: "checkpoint",
    "exact": lambda: "exact",
    "adjoint": lambda: adpm.Adjoint(),
    "adjoint_stored": lambda: adpm.Adjoint(state="stored"),
    "adjoint_heun": lambda: adpm.Adjoint(state="stored", solver="heun"),  # 2 VJPs a step, not in the defaults
    "truncated": lambda: adpm.Truncated(k=1),
    "reversible": lambda: adpm.Reversible(),
}
PEER_MODES = ("odeint_adjoint",)
ALL_MODES = tuple(ENGINE_MODES) + PEER_MODES
TORCHDIFFEQ_METHOD = {"ddim": "euler", "dpmpp2m": "heun2"}


def supports(mode: str, solver: str) -> str | None:
    """None if the mode runs with this solver, else the reason it does not."""
    if mode == "reversible" and solver != "ddim":
        return "EDICT is defined on the DDIM step only"
    if mode == "odeint_adjoint" and solver not in TORCHDIFFEQ_METHOD:
        return f"no torchdiffeq counterpart chosen for {solver}"
    return None


def forward_kind(mode: str) -> str:
    """Which plain sampler a mode's gradient should be timed against (EDICT for the reversible mode)."""
    return "forward_edict" if mode == "reversible" else "forward"


class CheckpointedEDICT(GradMode):
    """Autograd through the EDICT loop with per-step checkpointing (the reversible mode's reference)."""

    name = "edict_checkpoint"

    def __init__(self, p: float = 0.93):
        self.p = p

    def run(self, solver, x_T, cond, uncond, params):
        x = y = x_T
        for i in range(solver.num_steps):
            def step(x, y, i=i):
                return edict_step(solver, i, x, y, cond, uncond, self.p)

            x, y = checkpoint(step, x, y, use_reentrant=False)
        return x


def run_mode(mode: str, setup, solver: str, steps: int, x_T, cond, uncond):
    """x_0 of ``mode`` (a bench mode name, "forward", "forward_edict", "reference" or "reference_edict")."""
    common = dict(
        schedule=setup.schedule, steps=steps, cond=cond, uncond=uncond, guidance_scale=setup.guidance_scale,
        solver=solver, prediction_type=setup.prediction_type,
    )
    if mode == "forward":
        return adpm.sample(setup.model, x_T, grad=None, **common)
    if mode == "forward_edict":
        with torch.no_grad():
            return adpm.sample(setup.model, x_T, grad=adpm.Reversible(), **common)
    if mode == "reference":
        return adpm.sample(setup.model, x_T, grad="checkpoint", **common)
    if mode == "reference_backprop":
        return adpm.sample(setup.model, x_T, grad="backprop", **common)
    if mode == "reference_edict":
        return adpm.sample(setup.model, x_T, grad=CheckpointedEDICT(), **common)
    if mode == "reference_edict_backprop":
        return adpm.sample(setup.model, x_T, grad=adpm.Reversible(backward="autograd"), **common)
    if mode == "odeint_adjoint":
        return odeint_adjoint_sample(setup, solver, steps, x_T, cond, uncond)
    return adpm.sample(setup.model, x_T, grad=ENGINE_MODES[mode](), **common)


def odeint_adjoint_sample(setup, solver: str, steps: int, x_T, cond, uncond):
    """x_0 by torchdiffeq.odeint_adjoint on the ρ-ODE (see the module docstring)."""
    from torchdiffeq import odeint_adjoint

    schedule = setup.schedule
    sampler = adpm.build_sampler(setup.model, schedule, steps=steps, prediction_type=setup.prediction_type,
                                 guidance_scale=setup.guidance_scale)
    grid, denoiser = sampler.grid, sampler.denoiser
    uncond = uncond if denoiser.uses_guidance else None

    class Drift(torch.nn.Module):
        def forward(self, r, y):
            rho = float(r)
            t = float(schedule.t_from_rho(rho))
            return denoiser.eps(y / math.sqrt(1.0 + rho * rho), t, cond, uncond)

    params = [t for t in (cond, uncond) if t is not None and t.requires_grad]
    params += [p for p in setup.model.parameters() if p.requires_grad]
    x_last = x_T
    if len(grid) > 1:
        rho = torch.tensor(grid.rho, dtype=x_T.dtype)
        y_T = x_T / float(grid.alpha[0])
        y = odeint_adjoint(Drift(), y_T, rho, method=TORCHDIFFEQ_METHOD[solver], adjoint_params=tuple(params))[-1]
        x_last = y * float(grid.alpha[-1])
    _, x0 = denoiser.eps_and_x0(x_last, grid.t[-1], cond, uncond)
    return x0
