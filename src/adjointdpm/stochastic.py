"""Stochastic samplers as step maps with an injected noise input z_i.

A stochastic step is a deterministic map of one more input, x_{i+1} = Φ_i(x_i, h_i, z_i; c, θ), with
z_i ~ N(0, I) the i-th ``scheduler.step`` call's random draw. Each sampler below owns a noise source
whose ``noise_at(i, like)`` gives z_i, so the gradient modes (which only call ``step``) differentiate it
unchanged: an explicit noise tensor that requires grad is one more parameter (``∂L/∂noise`` accumulates
through each slice ``noise[i]``), and a seeded source regenerates z_i on the way back instead of storing it.

Grid point i has (t_i, α_i, σ_i), ρ_i = σ_i/α_i, λ_i = log(α_i/σ_i); step i lands on point i+1 (the grid's
end point after the last step). Primes denote point i+1. x̂₀, ε̂ are the model's predictions at point i.

    ddim (η > 0)     s_i = η (σ'/σ) √(1 − α²/α'²)
                     x' = α' x̂₀ + √(σ'² − s_i²) ε̂ + s_i z_i                         (DDIMScheduler(eta=η))
    ddpm             a = α/α',  β = σ² − a² σ'²  (= 1 − ᾱ_t/ᾱ_prev on a VP path)
                     x' = (α' β/σ²) x̂₀ + (a σ'²/σ²) x + s_i z_i,   s_i = √max(σ'² β/σ², 1e-20)
                     ("fixed_small"; √β for "fixed_large"); no noise where t_i = 0  (DDPMScheduler)
    euler_ancestral  ρ_up = √(ρ'²(ρ² − ρ'²)/ρ²),  ρ_down = √(ρ'² − ρ_up²),  y = x/α
                     x' = α' [x̂₀ + (ρ_down/ρ)(y − x̂₀) + ρ_up z_i]              (EulerAncestralDiscreteScheduler)
    dpmpp2m_sde      h = λ' − λ,  D = x̂₀ + (x̂₀ − x̂₀_{i−1})/(2r)  (r = (λ − λ_{i−1})/h; D = x̂₀ at a first-order step)
                     x' = (σ'/σ) e^{−h} x + α'(1 − e^{−2h}) D + σ' √(1 − e^{−2h}) z_i
                     (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), VP or flow sigmas;
                     solver_type="heun" weighs x̂₀ − x̂₀_{i−1} by α'((1 − e^{−2h})/(−2h) + 1)/r instead)
    lcm              D_i = c_out(t_i) x̂₀ + c_skip(t_i) x,   x' = α' D_i + σ' z_i,   the last step returns D
                     (LCMScheduler: c_skip = σ_d²/(τ² + σ_d²), c_out = τ/√(τ² + σ_d²), τ = t·timestep_scaling,
                     σ_d = 0.5; on any other schedule c_skip = 0, c_out = 1, which is
                     FlowMatchEulerDiscreteScheduler(stochastic_sampling=True): x' = (1 − σ') x̂₀ + σ' z_i)

η = 1 DDIM is DDPM's "fixed_small" posterior on the same grid. Turbo / schnell one- and few-step use is
these samplers on the scheduler's ``timestep_spacing="trailing"`` grid (one Euler-ancestral step from
t = 999 to σ = 0 injects nothing). z_i is drawn for every step, as diffusers draws it; where a step's
noise coefficient is 0 (the last step of most samplers) z_i has no effect and gets a zero gradient.

Noise sources. ``noise=`` of :func:`adjointdpm.sample` is one of

* a tensor of shape (N, B, *latent) — ``noise[i]`` is z_i, bit-for-bit what diffusers' i-th ``step`` adds
  when given it; it may require grad (DNO-style optimisation of every injected noise);
* an int seed or a ``torch.Generator`` (one 63-bit seed is drawn from it): z_i is drawn from a generator
  seeded with a hash of (seed, i) — counter-based, so the backward pass regenerates the same z_i without
  storing it, same-seed runs are bit-identical, and ``SeededNoise(seed, offset=k)`` continues the stream
  of a run resumed at step k;
* a list of int seeds or generators, one per sample (diffusers' ``generator=[…]``): sample b's z_i comes
  from its own (seed_b, i) generator, so a sample gets the same noises in any batch or subset of rows. (These draws are not diffusers' sequential draws from one generator: to
  reproduce a diffusers run exactly, pass its draws as the tensor.) :func:`noise_tensor` materialises the
  stream as the tensor;
* None: a seed drawn from torch's global generator (like diffusers without ``generator=``; reproducible
  under ``torch.manual_seed``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .grid import TimeGrid
from .model import Denoiser
from .solvers import LOWER_ORDER_FINAL_BELOW, Solver, solver_name
from .validation import check_noise_tensor

_SEED_RANGE = 2**63 - 1
#: DDPMScheduler clamps its posterior variance at this value before the square root
DDPM_MIN_VARIANCE = 1e-20
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


# ------------------------------------------------------------------------------------------- noise
def step_seed(seed: int, i: int) -> int:
    """The seed of step i's generator: a well-mixed 63-bit hash of (seed, i)."""
    words = np.random.SeedSequence([int(seed), int(i)]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class NoiseSource:
    """Gives z_i for step i; ``tensors`` are the ones to differentiate (an explicit noise tensor)."""

    tensors: tuple[torch.Tensor, ...] = ()

    def noise_at(self, i: int, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def with_leaf_tensors(self) -> "NoiseSource":
        """The same draws read from detached leaf copies of ``tensors`` (requires_grad kept), in the same order."""
        return self

    def rows(self, index) -> "NoiseSource":
        """The noises of the samples ``index`` only (a slice, list or index tensor of batch rows)."""
        raise NotImplementedError(f"{type(self).__name__} cannot select rows of its batch")


class StoredNoise(NoiseSource):
    """An explicit (N, B, *latent) tensor: z_i = noise[i]."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise
        self.tensors = (noise,)

    def noise_at(self, i, like):
        return self.noise[i]

    def with_leaf_tensors(self):
        return StoredNoise(self.noise.detach().requires_grad_(self.noise.requires_grad))

    def rows(self, index) -> "StoredNoise":
        """The noises of the samples ``index`` (a slice, list or index tensor): ``noise[:, index]``."""
        return StoredNoise(self.noise[:, index])


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"a noise seed must be a non-negative integer, got {seed!r}")
    return int(seed)


class SeededNoise(NoiseSource):
    """z_i ~ N(0, I) from a generator seeded with ``step_seed(seed, offset + i)``, on ``like``'s device.

    ``seed`` is one int (one draw of the whole batch per step) or one int per sample (sample b's z_i from
    its own generator: its stream does not depend on the batch it is sampled in, like diffusers'
    ``generator=[…]`` list); ``rows(index)`` is then the stream of those samples."""

    def __init__(self, seed, offset: int = 0):
        if isinstance(seed, (list, tuple, np.ndarray, torch.Tensor)):
            self.seed = tuple(_check_seed(int(s) if isinstance(s, torch.Tensor) else s) for s in seed)
            if not self.seed:
                raise ValueError("SeededNoise needs at least one per-sample seed")
        else:
            self.seed = _check_seed(seed)
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
            raise ValueError(f"SeededNoise(offset=…) is the first step's index and must be an integer ≥ 0, got {offset!r}")
        self.offset = int(offset)

    @property
    def per_sample(self) -> bool:
        return isinstance(self.seed, tuple)

    def _draw(self, seed: int, i: int, shape, like):
        generator = torch.Generator(device=like.device).manual_seed(step_seed(seed, self.offset + i))
        return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)

    def noise_at(self, i, like):
        if not self.per_sample:
            return self._draw(self.seed, i, like.shape, like)
        if len(self.seed) != like.shape[0]:
            raise ValueError(f"SeededNoise has {len(self.seed)} per-sample seeds for a batch of {like.shape[0]}: "
                             "give one seed per sample of x_T")
        return torch.stack([self._draw(s, i, like.shape[1:], like) for s in self.seed])

    def rows(self, index) -> "SeededNoise":
        """The stream of the samples ``index`` (a slice, list or index tensor) of a per-sample source."""
        if not self.per_sample:
            raise ValueError("a single-seed SeededNoise draws each step for the whole batch, so its rows cannot be "
                             "taken apart: give one seed per sample (SeededNoise([s_1, …, s_B]))")
        if isinstance(index, slice):
            picked = self.seed[index]
        else:
            picked = [self.seed[int(j)] for j in torch.as_tensor(index).flatten()]
        return SeededNoise(list(picked), self.offset)

    def __repr__(self) -> str:
        return f"SeededNoise(seed={self.seed}, offset={self.offset})"


def sample_streams(seed: int, sample_ids) -> SeededNoise:
    """Per-sample streams of one run: sample j (of ``sample_ids``) draws from seed ``step_seed(seed, j)``,
    so a sample's noises depend on (seed, j) only, not on the batch it is sampled in."""
    ids = torch.as_tensor(sample_ids).flatten().tolist()
    if not ids:
        raise ValueError("sample_streams needs at least one sample id")
    return SeededNoise([step_seed(_check_seed(seed), int(j)) for j in ids])


def noise_tensor(seed, num_steps: int, like: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """The (N, B, *latent) tensor a seeded run injects: ``noise_tensor(s, N, x_T)[i]`` is its z_i
    (``seed``: one int, or one per sample)."""
    source = SeededNoise(seed, offset)
    return torch.stack([source.noise_at(i, like) for i in range(num_steps)])


def diffusers_draws(generator, scheduler, like: torch.Tensor, *, solver: str, eta: float = 0.0) -> torch.Tensor:
    """The (N, B, *latent) noises a diffusers pipeline's ``scheduler.step(…, generator=generator)`` calls
    draw, in order, from the generator's current state, as ``noise=`` takes them: a pipeline run with
    ``generator=g`` (a torch.Generator or one per sample) is ``x_T`` drawn first (``prepare_latents``: one
    ``randn`` of the latent shape from g), then ``diffusers_draws(g, scheduler, x_T, solver=…)``.
    ``generator=None``: torch's global generator of x_T's device, which is what the steps draw from in
    pipelines that do not hand their generator to ``scheduler.step`` (SD3, Flux): seed it with
    ``torch.manual_seed`` before the pipeline call and again before this one.

    ``scheduler`` is configured and has its timesteps set (N = len(scheduler.timesteps)). Each step draws
    ``randn(latent shape)`` from the generator in the scheduler's dtype — like's dtype, float32 for
    DPM-Solver's SDE — except where the scheduler draws nothing (DDPM at t = 0, LCMScheduler's last step):
    there z_i = 0 (it has no effect). Draws come out bit-identical to diffusers' on the generator's device.
    """
    name = solver_name(solver)
    if not is_stochastic(name, eta):
        raise ValueError(f"solver={solver!r} is deterministic and draws no noise (for DDIM give eta > 0)")
    timesteps = [float(t) for t in scheduler.timesteps]
    if name == "ddpm":
        draws = [t > 0 for t in timesteps]
    elif name == "lcm" and not _config(scheduler, "stochastic_sampling", False):
        draws = [i < len(timesteps) - 1 for i in range(len(timesteps))]
    else:
        draws = [True] * len(timesteps)
    dtype = torch.float32 if name == "dpmpp2m_sde" else like.dtype
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    if len(generators) not in (1, like.shape[0]):
        raise ValueError(f"{len(generators)} generators for a batch of {like.shape[0]}: give one, or one per sample")

    def draw() -> torch.Tensor:
        if len(generators) == 1:
            g = generators[0]
            return torch.randn(like.shape, generator=g, device=like.device if g is None else g.device, dtype=dtype)
        return torch.cat([torch.randn((1, *like.shape[1:]), generator=g, device=g.device, dtype=dtype)
                          for g in generators])

    return torch.stack([draw().to(like) if d else torch.zeros_like(like) for d in draws])


def resolve_noise(noise, num_steps: int, x_T: torch.Tensor) -> NoiseSource:
    """A noise source from ``noise=`` (tensor, int seed, torch.Generator, a list of either with one per
    sample, NoiseSource or None)."""
    if isinstance(noise, NoiseSource):
        source = noise
    elif noise is None:
        source = SeededNoise(int(torch.randint(0, _SEED_RANGE, (1,)).item()))
    elif isinstance(noise, torch.Generator):
        source = SeededNoise(_seed_from(noise))
    elif isinstance(noise, torch.Tensor):
        check_noise_tensor(noise, num_steps, x_T)
        source = StoredNoise(noise)
    elif isinstance(noise, (int, np.integer)) and not isinstance(noise, bool):
        source = SeededNoise(noise)
    elif isinstance(noise, (list, tuple)) and noise and all(
            isinstance(s, torch.Generator) or (isinstance(s, (int, np.integer)) and not isinstance(s, bool)) for s in noise):
        source = SeededNoise([_seed_from(s) if isinstance(s, torch.Generator) else s for s in noise])
    else:
        raise TypeError(
            "noise must be an int seed, a torch.Generator, a list of either (one per sample), a tensor of shape "
            f"(N, B, …) or None, got {type(noise).__name__}"
        )
    if isinstance(source, SeededNoise) and source.per_sample and len(source.seed) != x_T.shape[0]:
        raise ValueError(f"noise has {len(source.seed)} per-sample seeds but x_T has {x_T.shape[0]} samples: "
                         "give one per sample")
    return source


def _seed_from(generator: torch.Generator) -> int:
    """One 63-bit seed drawn from a generator (it advances, as a diffusers pipeline's draw would)."""
    return int(torch.randint(0, _SEED_RANGE, (1,), generator=generator, device=generator.device).item())


# ------------------------------------------------------------------------------------------ solvers
def _config(scheduler, key, default):
    return getattr(getattr(scheduler, "config", None), key, default)


def _refuse_clipping(scheduler, name: str) -> None:
    if _config(scheduler, "thresholding", False) or _config(scheduler, "clip_sample", False):
        raise ValueError(
            f"solver={name!r} does not clip or threshold x̂₀, but {type(scheduler).__name__} is configured to; "
            "set clip_sample=False and thresholding=False on the scheduler (latent-diffusion pipelines do)"
        )


class StochasticSolver(Solver):
    """A solver whose step i adds z_i = ``noise.noise_at(i, x)``."""

    stochastic = True

    def __init__(self, denoiser: Denoiser, grid: TimeGrid, noise: NoiseSource, scheduler=None):
        super().__init__(denoiser, grid)
        self.noise, self.scheduler = noise, scheduler

    def z(self, i: int, like: torch.Tensor) -> torch.Tensor:
        return self.noise.noise_at(i, like)


class EtaDDIM(StochasticSolver):
    name, order = "ddim", 1

    def __init__(self, denoiser, grid, noise, scheduler=None, eta: float = 1.0):
        super().__init__(denoiser, grid, noise, scheduler)
        _refuse_clipping(scheduler, "ddim")
        self.eta = float(eta)

    def step(self, i, x, hist, cond, uncond):
        g = self.grid
        eps, x0 = self.predict(i, x, cond, uncond)
        a, s, (a_next, s_next) = g.alpha_at(i), g.sigma_at(i), g.step_end(i)
        std = self.eta * (s_next / s) * math.sqrt(max(0.0, 1.0 - (a / a_next) ** 2))
        direction = math.sqrt(max(0.0, s_next**2 - std**2))
        out = a_next * x0 + direction * eps if direction > 0 else a_next * x0
        return out + std * self.z(i, x), ()


class DDPM(StochasticSolver):
    name, order = "ddpm", 1

    def __init__(self, denoiser, grid, noise, scheduler=None):
        super().__init__(denoiser, grid, noise, scheduler)
        _refuse_clipping(scheduler, "ddpm")
        # (other schedulers' configs may hold variance_type=None: no variance of the model's, DDPM's default)
        self.variance_type = _config(scheduler, "variance_type", None) or "fixed_small"
        if self.variance_type not in DDPM_VARIANCE_TYPES:
            raise ValueError(
                f"solver='ddpm' supports variance_type {', '.join(DDPM_VARIANCE_TYPES)}, but the scheduler has "
                f"{self.variance_type!r}; configure DDPMScheduler(variance_type='fixed_small')"
            )

    def step(self, i, x, hist, cond, uncond):
        g = self.grid
        _, x0 = self.predict(i, x, cond, uncond)
        a, s, (a_next, s_next) = g.alpha_at(i), g.sigma_at(i), g.step_end(i)
        ratio = a / a_next
        beta = s * s - ratio * ratio * s_next * s_next
        mean = (a_next * beta / (s * s)) * x0 + (ratio * s_next * s_next / (s * s)) * x
        if g.t[i] <= 0:  # DDPMScheduler draws no noise at t = 0
            return mean, ()
        if self.variance_type == "fixed_large":
            std = math.sqrt(max(beta, 0.0))
        else:
            std = math.sqrt(max(s_next * s_next * beta / (s * s), DDPM_MIN_VARIANCE))
        return mean + std * self.z(i, x), ()


class EulerAncestral(StochasticSolver):
    name, order = "euler_ancestral", 1

    def __init__(self, denoiser, grid, noise, scheduler=None):
        super().__init__(denoiser, grid, noise, scheduler)
        if not np.all(grid.alpha > 0):
            raise ValueError(
                "solver='euler_ancestral' steps in ρ = σ/α (k-diffusion's σ), which is infinite where α = 0 "
                "(a flow-matching grid from σ = 1); use solver='lcm' (FlowMatchEuler's stochastic_sampling), "
                "'dpmpp2m_sde' or 'ddim' with eta > 0"
            )

    def step(self, i, x, hist, cond, uncond):
        g = self.grid
        _, x0 = self.predict(i, x, cond, uncond)
        a, a_next = g.alpha_at(i), g.alpha_at(i + 1)
        rho, rho_next = g.sigma_at(i) / a, g.sigma_at(i + 1) / a_next
        up = math.sqrt(max(0.0, rho_next**2 * (rho**2 - rho_next**2) / rho**2))
        down = math.sqrt(max(0.0, rho_next**2 - up**2))
        y = x / a
        return a_next * (x0 + (down / rho) * (y - x0) + up * self.z(i, x)), ()


class DPMSolverPP2MSDE(StochasticSolver):
    name, order = "dpmpp2m_sde", 2

    def __init__(self, denoiser, grid, noise, scheduler=None):
        super().__init__(denoiser, grid, noise, scheduler)
        self.solver_type = _config(scheduler, "solver_type", "midpoint")
        self.solver_order = int(_config(scheduler, "solver_order", 2))
        if self.solver_type not in ("midpoint", "heun") or self.solver_order not in (1, 2):
            raise ValueError(
                "solver='dpmpp2m_sde' is DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++') with "
                f"solver_order 1 or 2 and solver_type 'midpoint' or 'heun'; the scheduler has solver_order="
                f"{self.solver_order}, solver_type={self.solver_type!r}"
            )

    def _first_order(self, i: int) -> bool:
        if i == 0 or self.solver_order == 1:
            return True
        if i < self.num_steps - 1:
            return False
        lower_final = _config(self.scheduler, "lower_order_final", True) and self.num_steps < LOWER_ORDER_FINAL_BELOW
        return bool(_config(self.scheduler, "euler_at_final", False)) or lower_final or self.grid.ends_clean

    def step(self, i, x, hist, cond, uncond):
        g = self.grid
        _, x0 = self.predict(i, x, cond, uncond)
        s, a_next, s_next = g.sigma_at(i), g.alpha_at(i + 1), g.sigma_at(i + 1)
        with np.errstate(over="ignore", invalid="ignore"):
            h = g.lam_at(i + 1) - g.lam_at(i)  # +inf where α_i = 0 or σ' = 0
            decay = float(np.exp(-h)) if np.isfinite(h) else 0.0  # e^{−h}
            one_minus = float(-np.expm1(-2.0 * h)) if np.isfinite(h) else 1.0  # 1 − e^{−2h}
        out = a_next * one_minus * x0
        if not self._first_order(i):
            r = (g.lam_at(i) - g.lam_at(i - 1)) / h
            if np.isfinite(r) and r != 0:
                d1 = (x0 - hist[0]) / float(r)
                if self.solver_type == "midpoint":
                    out = out + (0.5 * a_next * one_minus) * d1
                else:
                    out = out + (a_next * (one_minus / (-2.0 * h) + 1.0)) * d1
        if decay != 0.0:
            out = out + (s_next / s * decay) * x
        if s_next != 0.0:
            out = out + (s_next * math.sqrt(one_minus)) * self.z(i, x)
        return out, (x0,)


class LCM(StochasticSolver):
    name, order = "lcm", 1
    sigma_data = 0.5

    def __init__(self, denoiser, grid, noise, scheduler=None):
        super().__init__(denoiser, grid, noise, scheduler)
        _refuse_clipping(scheduler, "lcm")
        self.boundary = type(scheduler).__name__ == "LCMScheduler"
        self.timestep_scaling = float(_config(scheduler, "timestep_scaling", 10.0))

    def scalings(self, i: int) -> tuple[float, float]:
        """(c_skip, c_out) at grid point i: LCMScheduler's boundary condition, else (0, 1)."""
        if not self.boundary:
            return 0.0, 1.0
        scaled = float(self.grid.t[i]) * self.timestep_scaling
        norm = scaled**2 + self.sigma_data**2
        return self.sigma_data**2 / norm, scaled / math.sqrt(norm)

    def step(self, i, x, hist, cond, uncond):
        g = self.grid
        _, x0 = self.predict(i, x, cond, uncond)
        c_skip, c_out = self.scalings(i)
        denoised = c_out * x0 + c_skip * x if c_skip != 0.0 else c_out * x0
        if i == self.num_steps - 1:  # no noise at the last step: one-step sampling is deterministic
            return denoised, ()
        return g.alpha_at(i + 1) * denoised + g.sigma_at(i + 1) * self.z(i, x), ()


STOCHASTIC_SOLVERS: dict[str, type[StochasticSolver]] = {
    cls.name: cls for cls in (DDPM, EulerAncestral, DPMSolverPP2MSDE, LCM)
}


def is_stochastic(name: str, eta: float) -> bool:
    """Whether solver ``name`` (canonical) with ``eta`` injects noise."""
    return name in STOCHASTIC_SOLVERS or (name == "ddim" and eta > 0)


def make_stochastic_solver(name: str, denoiser: Denoiser, grid: TimeGrid, noise: NoiseSource, scheduler=None,
                           eta: float = 0.0) -> StochasticSolver:
    if name == "ddim":
        return EtaDDIM(denoiser, grid, noise, scheduler, eta)
    return STOCHASTIC_SOLVERS[name](denoiser, grid, noise, scheduler)


def check_deterministic_scheduler(scheduler, name: str) -> None:
    """A scheduler configured to sample stochastically, or to clip / threshold x̂₀, is not followed by a
    deterministic solver by mistake (it would give other samples than the scheduler, silently)."""
    _refuse_clipping(scheduler, name)
    if _config(scheduler, "stochastic_sampling", False):
        raise ValueError(
            f"{type(scheduler).__name__} has stochastic_sampling=True but solver={name!r} is deterministic; "
            "use solver='lcm' (its stochastic step) with noise=…, or set stochastic_sampling=False"
        )


__all__ = ["DDPM", "DPMSolverPP2MSDE", "EtaDDIM", "EulerAncestral", "LCM", "NoiseSource", "STOCHASTIC_SOLVERS",
           "SeededNoise", "StochasticSolver", "StoredNoise", "check_deterministic_scheduler", "is_stochastic", "make_stochastic_solver",
           "diffusers_draws", "noise_tensor", "resolve_noise", "sample_streams", "step_seed"]
