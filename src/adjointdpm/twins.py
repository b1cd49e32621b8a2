"""Each diffusers scheduler class and the engine solver that takes exactly its steps (its *twin*).

    DDIMScheduler                      ddim            (η is a step argument: 'ddim' with eta= for η > 0)
    EulerDiscreteScheduler             ddim            (Euler in ρ = σ/α is DDIM's step)
    FlowMatchEulerDiscreteScheduler    ddim            (stochastic_sampling=True: lcm)
    DPMSolverMultistepScheduler        dpmpp2m         (algorithm_type "dpmsolver++", solver_order 2, midpoint,
                                                        lower_order_final, not euler_at_final; order 1: ddim;
                                                        "sde-dpmsolver++": dpmpp2m_sde)
    HeunDiscreteScheduler              heun
    PNDMScheduler                      pndm            (PLMS, skip_prk_steps or the Runge–Kutta warm-up)
    UniPCMultistepScheduler            unipc
    EulerAncestralDiscreteScheduler    euler_ancestral
    DDPMScheduler                      ddpm
    LCMScheduler                       lcm

Any other class, or a configuration without a twin (DPM-Solver of order 3, its "dpmsolver" algorithm,
…), is refused by :func:`twin_solver` with one error naming these classes and the ``solver=`` option (the
commands' ``--solver``): an explicit solver samples any scheduler's noise schedule on its grid.
"""

from __future__ import annotations

SUPPORTED = ("DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
             "DPMSolverMultistepScheduler", "HeunDiscreteScheduler", "PNDMScheduler", "UniPCMultistepScheduler",
             "EulerAncestralDiscreteScheduler", "DDPMScheduler", "LCMScheduler")
_PLAIN = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "ddim", "HeunDiscreteScheduler": "heun",
          "PNDMScheduler": "pndm", "UniPCMultistepScheduler": "unipc",
          "EulerAncestralDiscreteScheduler": "euler_ancestral", "DDPMScheduler": "ddpm", "LCMScheduler": "lcm"}


class NoTwinError(ValueError):
    """A scheduler the engine cannot follow step for step."""


def _refuse(scheduler, why: str = "") -> NoTwinError:
    name = type(scheduler).__name__
    return NoTwinError(
        f"{name}{' ' + why if why else ''} has no exact twin among the engine's solvers (schedulers followed step for "
        f"step: {', '.join(SUPPORTED)}); pick a solver with solver=… (commands: --solver), e.g. 'dpmpp2m', "
        "'ddim', 'unipc' or 'pndm', which samples its noise schedule on its grid"
    )


def twin_solver(scheduler) -> str:
    """The engine solver that reproduces ``scheduler``'s steps (see the module docstring), or a NoTwinError."""
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", None)

    def option(key, default=None):
        return getattr(config, key, default)

    if name in _PLAIN:
        return _PLAIN[name]
    if name == "FlowMatchEulerDiscreteScheduler":
        return "lcm" if option("stochastic_sampling", False) else "ddim"
    if name == "DPMSolverMultistepScheduler":
        algorithm, order = option("algorithm_type", "dpmsolver++"), int(option("solver_order", 2))
        if algorithm == "dpmsolver++" and order == 1:
            return "ddim"
        if algorithm == "dpmsolver++" and order == 2:
            unlike = [f"{k}={option(k)!r}" for k, plain in (("solver_type", "midpoint"), ("lower_order_final", True),
                                                              ("euler_at_final", False)) if option(k, plain) != plain]
            if unlike:
                raise _refuse(scheduler, f"({', '.join(unlike)})")
            return "dpmpp2m"
        if algorithm == "sde-dpmsolver++" and order in (1, 2):
            return "dpmpp2m_sde"
        raise _refuse(scheduler, f"(algorithm_type={algorithm!r}, solver_order={order})")
    raise _refuse(scheduler)


def has_twin(scheduler) -> bool:
    try:
        twin_solver(scheduler)
    except NoTwinError:
        return False
    return True


__all__ = ["NoTwinError", "SUPPORTED", "has_twin", "twin_solver"]
