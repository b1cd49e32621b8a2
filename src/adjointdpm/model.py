"""The model adapter: any diffusion network → (ε̂, x̂₀) of a Gaussian path x = α x̂₀ + σ ε.

Each prediction type gives both, with no division by a coefficient that can vanish on its path
(α = 0 at the start of a flow-matching path, σ = 0 at the end of every path):

    epsilon          ε̂ = out                       x̂₀ = (x − σ ε̂)/α
    sample           x̂₀ = out                      ε̂ = (x − α x̂₀)/σ
    v_prediction     v = α ε − σ x₀:   x̂₀ = (α x − σ v)/(α² + σ²),   ε̂ = (σ x + α v)/(α² + σ²)
    flow_prediction  v = ε − x₀:       x̂₀ = (x − σ v)/(α + σ),       ε̂ = (x + α v)/(α + σ)

(VP: α² + σ² = 1; flow matching: α + σ = 1.) A network whose output has twice the sample's channels
(learned variance: DiT, PixArt, DeepFloyd) is split and its first half used, as diffusers' pipelines do.

Classifier-free guidance is part of the drift, out = out_u + w (out_c − out_u), evaluated in one batched
network call on [x; x] with [uncond; cond] (see :mod:`adjointdpm.conditioning` for dict conditioning).
Classifier guidance (Dhariwal & Nichol) is part of it too: with a user classifier log p(y | x_t, t),

    ε̂ ← ε̂ − s σ ∇ₓ log p(y | x, t),      x̂₀ ← x̂₀ + s (σ²/α) ∇ₓ log p(y | x, t)

(the same x, so x = α x̂₀ + σ ε̂ still holds). The gradient ∇ₓ is taken with ``create_graph`` whenever a
graph is being built, so every gradient mode differentiates through it (a double backward).

Accepted networks, unchanged, called exactly as their diffusers pipeline calls them:

* ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL): ``unet(x, t, encoder_hidden_states=…, **cond)``;
* ``UNet2DModel``: ``unet(x, t)``;
* diffusers transformers (SD3, Flux, PixArt, DiT, …): ``net(hidden_states=x, timestep=t, **cond)``, with
  Flux's timestep in [0, 1] (``t/1000``, as ``FluxPipeline`` passes it);
* any callable ``(x, t, cond) -> tensor``.

An output with a ``.sample`` attribute or a tuple is unwrapped.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from .conditioning import batch_tree, guidance_pair

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
PREDICTION_ALIASES = {"flow": "flow_prediction", "velocity": "flow_prediction", "v": "v_prediction", "eps": "epsilon"}
#: conditioning keys without a batch dimension (positional ids), passed once even under guidance
UNBATCHED_KEYS = frozenset({"txt_ids", "img_ids"})


class GridPoint(NamedTuple):
    """A model time and its path coefficients (α, σ), as the sampler's grid holds them."""

    t: float
    alpha: float
    sigma: float


class NetworkStyle(NamedTuple):
    kind: str  # "unet" | "unconditional" | "transformer" | "callable"
    timestep_scale: float = 1.0
    parameters: frozenset[str] = frozenset()
    accepts_any: bool = False  # forward takes **kwargs


def network_style(model: Callable) -> NetworkStyle:
    """How the network is called, read from its forward signature."""
    forward = model.forward if isinstance(model, nn.Module) else model
    try:
        signature = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return NetworkStyle("callable")
    names = list(signature)
    params = frozenset(names)
    any_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    if isinstance(model, nn.Module) and names and names[0] == "hidden_states" and "timestep" in params:
        flux = "img_ids" in params and "txt_ids" in params
        return NetworkStyle("transformer", 1e-3 if flux else 1.0, params, any_kw)
    if "encoder_hidden_states" in params:
        return NetworkStyle("unet", 1.0, params, any_kw)
    if isinstance(model, nn.Module) and "timestep" in params and "return_dict" in params:
        return NetworkStyle("unconditional", 1.0, params, any_kw)
    return NetworkStyle("callable", 1.0, params, any_kw)


def _unwrap(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the model returned {type(output).__name__}; expected a tensor, a tuple or an object with .sample")


def model_time_dtype(dtype: torch.dtype) -> torch.dtype:
    """Timesteps are passed in at least float32, so fractional times survive half-precision models."""
    return torch.promote_types(dtype, torch.float32)


def normalise_prediction_type(name: str | None) -> str:
    name = PREDICTION_ALIASES.get(name, name) if name is not None else "epsilon"
    if name not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {name!r}; use one of {', '.join(PREDICTION_TYPES)} "
            "(diffusers keeps it in scheduler.config.prediction_type)"
        )
    return name


@dataclass
class Denoiser:
    """(ε̂, x̂₀)(x, t, cond, uncond) for a network, a schedule, a prediction type and guidance.

    ``t`` is a :class:`GridPoint` (the sampler's grid gives α, σ exactly as its diffusers scheduler has
    them) or a plain model time (α, σ from ``schedule``).
    """

    model: Callable
    schedule: Any
    prediction_type: str = "epsilon"
    guidance_scale: float = 1.0
    model_kwargs: dict = field(default_factory=dict)
    classifier: Callable | None = None
    classifier_scale: float = 1.0

    def __post_init__(self):
        self.prediction_type = normalise_prediction_type(self.prediction_type)
        self.style = network_style(self.model)

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale != 1.0

    def point(self, t) -> GridPoint:
        if isinstance(t, GridPoint):
            return t
        t = float(t)
        return GridPoint(t, float(self.schedule.alpha(t)), float(self.schedule.sigma(t)))

    # -- the network ----------------------------------------------------------------------------
    def _network(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        kind = self.style.kind
        kwargs = dict(self.model_kwargs)
        if kind in ("unet", "transformer"):
            if isinstance(cond, dict):
                kwargs.update(cond)
            elif cond is not None:
                kwargs["encoder_hidden_states"] = cond
        if kind == "unet":
            out = self.model(x, t, return_dict=False, **kwargs)
        elif kind == "transformer":
            out = self.model(hidden_states=x, timestep=t * self.style.timestep_scale, return_dict=False, **kwargs)
        elif kind == "unconditional":
            out = self.model(x, t, return_dict=False, **kwargs)
        else:
            out = self.model(x, t, cond, **kwargs)
        out = _unwrap(out)
        if out.ndim == x.ndim and x.ndim >= 3 and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # learned variance: the prediction is the first half
        return out

    def raw(self, x, t, cond=None, uncond=None) -> torch.Tensor:
        """The network output (guided when the scale is not 1) at model time t."""
        t = self.point(t).t
        batch = x.shape[0]
        if not self.uses_guidance:
            t_vec = torch.full((batch,), t, dtype=model_time_dtype(x.dtype), device=x.device)
            return self._network(x, t_vec, batch_tree(cond, batch, UNBATCHED_KEYS))
        t_vec = torch.full((2 * batch,), t, dtype=model_time_dtype(x.dtype), device=x.device)
        both = self._network(torch.cat([x, x]), t_vec, guidance_pair(uncond, cond, batch, UNBATCHED_KEYS))
        out_u, out_c = both.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)

    # -- predictions ----------------------------------------------------------------------------
    def eps_and_x0(self, x, t, cond=None, uncond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂₀) at model time t (a GridPoint or a float)."""
        p = self.point(t)
        out = self.raw(x, p, cond, uncond)
        a, s = p.alpha, p.sigma
        kind = self.prediction_type
        if kind == "epsilon":
            eps, x0 = out, (x - s * out) / a
        elif kind == "sample":
            eps, x0 = (x - a * out) / s, out
        elif kind == "v_prediction":
            norm = a * a + s * s
            eps, x0 = (s * x + a * out) / norm, (a * x - s * out) / norm
        else:
            total = a + s
            eps, x0 = (x + a * out) / total, (x - s * out) / total
        if self.classifier is not None:
            eps, x0 = self._classifier_guidance(x, p, eps, x0)
        return eps, x0

    def eps(self, x, t, cond=None, uncond=None) -> torch.Tensor:
        """ε̂ at model time t."""
        return self.eps_and_x0(x, t, cond, uncond)[0]

    def _classifier_guidance(self, x, p: GridPoint, eps, x0):
        if p.alpha <= 0:
            raise ValueError(f"classifier guidance is undefined where α = 0 (model time {p.t:g}); start the grid below it")
        build_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x_in = x if x.requires_grad else x.detach().requires_grad_()
            t_vec = torch.full((x.shape[0],), p.t, dtype=model_time_dtype(x.dtype), device=x.device)
            log_p = self.classifier(x_in, t_vec)
            if not isinstance(log_p, torch.Tensor) or not log_p.requires_grad:
                raise ValueError("the classifier's log p(y | x, t) does not depend on x; return a differentiable tensor")
            (score,) = torch.autograd.grad(log_p.sum(), x_in, create_graph=build_graph)
        step = self.classifier_scale * p.sigma
        return eps - step * score, x0 + (step * p.sigma / p.alpha) * score


def trainable_parameters(model: Callable, extra: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Every parameter of the network with requires_grad (full weights, a subset, or LoRA adapters),
    plus explicitly named extra tensors; each tensor once."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    candidates = list(model.parameters()) if isinstance(model, nn.Module) else []
    candidates += list(extra or [])
    for p in candidates:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            found.append(p)
    return found
