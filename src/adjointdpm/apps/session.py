"""The loaded model and how the applications sample from it: :class:`Session`.

A session holds a :class:`~adjointdpm.components.DiffusionComponents` (the embedded model or a local diffusers
folder), the engine settings (gradient mode, solver, steps, guidance) and where the model's critics are
(``critics_path``; :mod:`.choose` loads them). Its
:meth:`Session.sampled_loss` is the only place where an application meets the engine: it samples x_0 from a
starting state with the chosen gradient mode, applies the objective (which decodes), and returns the loss to
back-propagate, whatever the mode (the one-step x̂₀ baseline back-propagates step by step itself; see
:mod:`.baselines`).

The image size, the T5 prompt length and the negative prompt (``--height``, ``--width``,
``--max-sequence-length``, ``--negative-prompt``) go into the model's settings, which the family reads.

The engine is asked, never assembled here: the family's sampling setup (schedule, grid, guidance, negative
conditioning) in ``__init__``, ``adpm.sample`` in :meth:`sample`, ``adpm.build_sampler`` in :meth:`sampler`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

import adjointdpm as adpm

from . import prompt_embeddings
from .baselines import OneStep, grad_label, resolve_grad
from .checks import apply_image_settings, check_prompt_length, parse_device
from .errors import UserInputError
from .options import EngineOptions


class Session:
    """A model (embedded or a local diffusers folder) and how to sample from it."""

    def __init__(self, engine: EngineOptions, dp=None):
        from ..components import load_components
        from ..distributed import SingleProcess

        self.dp = SingleProcess() if dp is None else dp  # the processes the tasks of this session are spread over
        model = engine.model
        device = parse_device(engine.device)
        if self.dp.world_size > 1 and self.dp.device.type == "cuda":
            device = self.dp.device  # each process its own GPU
        self.comps = load_components(model, device=device, **engine.load_kwargs())
        self.model_path = None if model is None else str(self.comps.load_options.get("single_file") or self.comps.path)
        self.critics_path = engine.critics
        # --height/--width/--max-sequence-length/--negative-prompt: the family's latent shape and prompt encoding
        apply_image_settings(self.comps, engine.height, engine.width, engine.max_sequence_length,
                             engine.negative_prompt)
        self.negative_prompt = engine.negative_prompt
        self.image_options = {k: getattr(engine, k) for k in ("height", "width", "max_sequence_length",
                                                               "negative_prompt") if getattr(engine, k) is not None}
        settings = self.comps.settings
        self.solver = engine.solver or self.comps.default_solver()
        known = [*adpm.SOLVERS, *adpm.STOCHASTIC_SOLVER_NAMES]
        if self.solver not in known:
            raise UserInputError(f"unknown --solver {self.solver!r}; use one of {', '.join(known)}")
        # stochastic solvers draw each sample's injected noises from its own seeded stream (the same at every
        # call, so a resumed run continues identically; see noise_streams) unless a task optimises them
        from ..stochastic import is_stochastic
        from ..solvers import solver_name
        from ..validation import check_eta

        try:
            self.eta = check_eta(engine.eta, solver_name(self.solver))
        except (TypeError, ValueError) as e:
            raise UserInputError(f"--eta: {e}") from None
        self.stochastic = is_stochastic(solver_name(self.solver), self.eta)
        self.steps = int(settings.get("default_steps", 20) if engine.steps is None else engine.steps)
        if not 1 <= self.steps <= 1000:
            raise UserInputError(f"--steps must be in 1..1000, got {self.steps}")
        w = settings.get("default_guidance_scale", 1.0) if engine.guidance_scale is None else engine.guidance_scale
        grad = engine.grad_spec()
        self.grad = resolve_grad(grad)
        if self.stochastic and (isinstance(self.grad, OneStep) or self.grad.name in ("adjoint", "reversible")):
            raise UserInputError(f"--solver {self.solver}{' with --eta > 0' if self.solver == 'ddim' else ''} injects noise: --grad {grad} is defined for the "
                                 "deterministic samplers only; use --grad exact, backprop, checkpoint or truncated")
        self._setup_sampler(float(w))

    # ------------------------------------------------------------------ engine
    def _setup_sampler(self, w: float) -> None:
        """The schedule, the model times of the grid, the guidance scale, the negative conditioning and the
        family's prompt-encoding arguments: the family's own sampling setup (:mod:`adjointdpm.families`)."""
        setup = self.comps.family_spec.sampling_setup(self.comps, self.steps, w)
        self.schedule, self._times = setup.schedule, setup.timesteps
        self.guidance_scale, self._encode_kwargs, self.uncond = setup.guidance_scale, setup.encode_kwargs, setup.uncond

    @property
    def encode_kwargs(self) -> dict:
        """The family's extra prompt-encoding keywords (Flux: its distilled ``guidance`` value)."""
        return self._encode_kwargs

    def _uncond(self):
        return self.uncond if self.guidance_scale != 1.0 else None

    @property
    def forward_mode(self):
        """The mode whose forward pass defines the samples: None (the plain sampler) for every mode
        but the reversible one, which samples with EDICT's coupled chain."""
        return self.grad if getattr(self.grad, "name", None) == "reversible" else None

    def sample(self, x_start: torch.Tensor, cond, *, grad=None, start: int = 0, noise=None) -> torch.Tensor:
        """x_0 (latent) from a state at step ``start`` with an engine gradient mode (None: no graph).

        ``noise``: a stochastic solver's injected noises, an (N, B, …) tensor or a noise source
        (default: :meth:`noise_streams` of rows 0…B−1)."""
        if grad is None and self.forward_mode is not None:
            with torch.no_grad():
                return self.sample(x_start, cond, grad=self.forward_mode, start=start)
        return adpm.sample(self.network, x_start, schedule=self.schedule, timesteps=self.timesteps(start), cond=cond,
                           uncond=self._uncond(), guidance_scale=self.guidance_scale, solver=self.solver,
                           eta=self.eta, grad=grad, prediction_type=self.comps.prediction_type,
                           noise=self._noise_or_streams(noise, x_start.shape[0]))

    def sampler(self, start: int = 0) -> adpm.Sampler:
        """The engine's sampler of this session from step ``start`` on (no gradient mode: plain steps)."""
        return adpm.build_sampler(self.network, self.schedule, self.timesteps(start), solver=self.solver, eta=self.eta,
                                  prediction_type=self.comps.prediction_type, guidance_scale=self.guidance_scale)

    def advance(self, x_T: torch.Tensor, cond: torch.Tensor, to_step: int) -> torch.Tensor:
        """The sampler's state x at step ``to_step`` (its first ``to_step`` steps from x_T, no graph)."""
        self.timesteps(to_step)  # validates the index
        if self.stochastic:
            raise UserInputError("--start-step needs a deterministic --solver (ddim with --eta 0, dpmpp2m, heun, pndm, unipc), "
                                 f"not {self.solver}{' with --eta > 0' if self.solver == 'ddim' else ''}")
        return self.sampler().advance(x_T, cond, self.uncond, to_step)

    # ------------------------------------------------------------------ settings
    @property
    def network(self) -> torch.nn.Module:
        """The denoising network (a UNet, or the SD3/Flux/PixArt transformer)."""
        return self.comps.network

    @property
    def device(self) -> torch.device:
        return self.comps.device

    def describe(self) -> dict:
        return {"model": self.model_path or "embedded", "grad": grad_label(self.grad), "solver": self.solver,
                "eta": self.eta, "steps": self.steps, "guidance_scale": self.guidance_scale, **self.image_options}

    def timesteps(self, start: int = 0) -> np.ndarray:
        """Model times of the sampling grid, from step ``start`` on."""
        t = self._times
        if not 0 <= start < len(t):
            raise UserInputError(f"--start-step must be in 0..{len(t) - 1} for {len(t)} steps, got {start}")
        return t[start:]

    # ------------------------------------------------------------------ text
    def check_prompt(self, prompt: str) -> None:
        check_prompt_length(self.comps.prompt_tokenizer, prompt)

    @torch.no_grad()
    def encode(self, prompts: list[str]):
        """The conditioning of ``prompts``: a (B, L, D) tensor, or the family's dict of network arguments."""
        for p in prompts:
            self.check_prompt(p)
        cond = prompt_embeddings.detached(self.comps.encode_prompt(list(prompts), **self._encode_kwargs))
        self.comps.release_encoders()  # (no task differentiates through them; the next encode brings them back)
        return cond

    def noise(self, n: int, seed: int) -> torch.Tensor:
        return self.comps.noise(n, seed)

    def noise_streams(self, sample_ids, seed: int = 0):
        """The injected noises of a stochastic solver for the samples ``sample_ids`` (None for a
        deterministic solver): sample j's z_i comes from its own generator, seeded by (seed, j, i), so a
        sample gets the same noises whichever batch, subset of rows or process samples it."""
        if not self.stochastic:
            return None
        from ..stochastic import sample_streams

        return sample_streams(seed, sample_ids)

    def noises_to_optimise(self, sample_ids, seed: int, like: torch.Tensor) -> torch.Tensor:
        """The samples' seeded streams as a (B, N, …) tensor, one row per sample like x_T (--optimize-noises
        starts from the noises sampled without it); one clear error for a deterministic solver."""
        if not self.stochastic:
            raise UserInputError("--optimize-noises needs a stochastic --solver (ddpm, euler_ancestral, "
                                 f"dpmpp2m_sde, lcm, or ddim with --eta > 0), not {self.solver}")
        streams = self.noise_streams(sample_ids, seed)
        return adpm.noise_tensor(streams.seed, self.steps, like).transpose(0, 1).contiguous()

    def injected_rows(self, noise_rows: torch.Tensor | None, sample_ids, seed: int, idx: torch.Tensor | None = None):
        """The injected noises of rows ``idx`` (default all) as ``adpm.sample`` takes them: (N, b, …) of
        optimised (B, N, …) ``noise_rows``, else the samples' seeded streams (None: deterministic)."""
        if noise_rows is None:
            return self.noise_streams(sample_ids if idx is None else sample_ids[idx.cpu()], seed)
        return (noise_rows if idx is None else noise_rows[idx]).transpose(0, 1)

    def gathered_noise(self, noise, like: torch.Tensor) -> torch.Tensor:
        """Every process's injected noises as one (N, n, …) CPU tensor, what ``adpm.sample(…, noise=…)``
        takes: ``noise`` is this process's (N, b, …) tensor or its samples' seeded streams (materialised)."""
        if not isinstance(noise, torch.Tensor):
            noise = adpm.noise_tensor(noise.seed, self.steps, like)
        return self.dp.gather_shards(noise.detach().transpose(0, 1)).transpose(0, 1).cpu().contiguous()

    # ------------------------------------------------------------------ sampling
    def _noise_or_streams(self, noise, n: int):
        if not self.stochastic:
            return None
        return self.noise_streams(range(n)) if noise is None else noise

    @torch.no_grad()
    def generate(self, x_start: torch.Tensor, cond, *, start: int = 0, batch_size: int = 64, noise=None) -> torch.Tensor:
        """Images in [-1, 1] (no graph), in batches (``noise``: a stochastic solver's injected noises of
        the whole batch, an (N, B, …) tensor or a noise source; default: :meth:`noise_streams` of its rows)."""
        latents = self.sample_latents(x_start, cond, start=start, batch_size=batch_size, noise=noise)
        return self.decode_images(latents, batch_size)

    @torch.no_grad()
    def sample_latents(self, x_start: torch.Tensor, cond, *, start: int = 0, batch_size: int = 64,
                       noise=None) -> torch.Tensor:
        """The x_0 latents :meth:`generate` decodes (no graph, in batches)."""
        noise = self._noise_or_streams(noise, x_start.shape[0])
        out = []
        for i in range(0, x_start.shape[0], batch_size):
            rows = slice(i, i + batch_size)
            c = cond if prompt_embeddings.count(cond) == 1 else prompt_embeddings.rows(cond, rows)
            z = None if noise is None else _noise_rows(noise, rows)
            out.append(self.sample(x_start[rows], c, grad=None, start=start, noise=z))
        return torch.cat(out)

    @torch.no_grad()
    def decode_images(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images in [-1, 1] of x_0 latents, decoded in batches."""
        return torch.cat([self.decode(latents[i:i + batch_size]).float() for i in range(0, latents.shape[0], batch_size)])

    def shares(self, n: int) -> bool:
        """Whether the processes share the work on an n-sample batch (each its rows), or each does all of it
        (one process, or fewer samples than processes)."""
        return self.dp.world_size > 1 and n >= self.dp.world_size

    def rows_here(self, n: int) -> torch.Tensor:
        """The rows of an n-sample batch this process works on in :meth:`generate_all`."""
        index = torch.arange(n)
        return self.dp.shard(index) if self.shares(n) else index

    def gather_rows(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """Every row of an n-sample batch from each process's :meth:`rows_here`, on every process."""
        return self.dp.gather_shards(values) if self.shares(n) else values

    @torch.no_grad()
    def generate_all(self, x_start: torch.Tensor, cond: torch.Tensor, *, start: int = 0, noise=None) -> torch.Tensor:
        """Images of a whole batch, the work shared by the processes (each generates its shard, the shards
        are gathered; a batch smaller than the number of processes is generated by every process)."""
        n = x_start.shape[0]
        noise = self._noise_or_streams(noise, n)
        if not self.shares(n):
            return self.generate(x_start, cond, start=start, noise=noise)
        c = cond if prompt_embeddings.count(cond) == 1 else prompt_embeddings.shard(self.dp, cond)
        z = None if noise is None else _noise_rows(noise, self.rows_here(n))
        return self.gather_rows(self.generate(self.dp.shard(x_start), c, start=start, noise=z), n)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self.comps.decode(x0)

    def sampled_loss(self, x_start: torch.Tensor, cond, objective: Callable[[torch.Tensor], torch.Tensor],
                     *, weights: torch.Tensor | None = None, start: int = 0, noise=None):
        """Sample x_0 from ``x_start`` with this session's gradient mode and apply ``objective``.

        ``objective(x0_latent) -> (B,)`` per-sample losses (it decodes itself); ``weights`` (B,)
        combine them (default: the mean). Returns ``(loss, per_sample, x0)``: ``loss`` to
        back-propagate (already back-propagated, and detached, for the one-step baseline),
        the per-sample losses of the actual samples and x_0, both detached.
        """
        b = x_start.shape[0]
        w = torch.full((b,), 1.0 / b, device=x_start.device) if weights is None else weights
        if isinstance(self.grad, OneStep):
            from .baselines import onestep_backward

            per, x0 = onestep_backward(self, x_start, cond, objective, w, start=start)
            return (per * w).sum().detach(), per, x0
        x0 = self.sample(x_start, cond, grad=self.grad, start=start, noise=noise)
        per = objective(x0)
        return (per * w.to(per.dtype)).sum(), per.detach(), x0.detach()


def _noise_rows(noise, rows):
    """The injected noises of some samples: ``noise[:, rows]`` of a tensor, ``rows`` of a noise source."""
    return noise[:, rows] if isinstance(noise, torch.Tensor) else noise.rows(rows)
