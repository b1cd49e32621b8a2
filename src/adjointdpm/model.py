"""The model adapter: any diffusion network → the noise prediction ε̂(x, t, c) of a VP diffusion.

With x = α x̂₀ + σ ε, each prediction type implies ε̂ (and x̂₀ = (x − σ ε̂)/α):

    epsilon       ε̂ = out
    sample        ε̂ = (x − α · out)/σ
    v_prediction  ε̂ = α · out + σ x        (v = α ε − σ x₀)

Classifier-free guidance is part of the drift, ε̂ = ε̂_u + w (ε̂_c − ε̂_u), evaluated in one batched
network call on [x; x] with [uncond; cond]. Every operation is differentiable, so the gradient
engine can back-propagate through the guidance to both embeddings.

Accepted networks, unchanged: a diffusers ``UNet2DConditionModel`` (called with
``encoder_hidden_states``), a diffusers ``UNet2DModel`` (unconditional), or any callable
``(x, t, cond) -> tensor`` (an output with a ``.sample`` attribute or a tuple is unwrapped).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .schedule import VPSchedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _call_style(model: Callable) -> str:
    """How to call the network: 'conditional' (diffusers cross-attention UNet), 'unconditional'
    (diffusers UNet2DModel-like: forward(sample, timestep, ...)), or 'callable' ((x, t, cond))."""
    forward = model.forward if isinstance(model, nn.Module) else model
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "callable"
    if "encoder_hidden_states" in params:
        return "conditional"
    if isinstance(model, nn.Module) and "timestep" in params and "return_dict" in params:
        return "unconditional"
    return "callable"


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


@dataclass
class Denoiser:
    """ε̂(x, t, cond, uncond) for a network, a schedule, a prediction type and a guidance scale."""

    model: Callable
    schedule: VPSchedule
    prediction_type: str = "epsilon"
    guidance_scale: float = 1.0
    model_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {self.prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)} "
                "(diffusers keeps it in scheduler.config.prediction_type)"
            )
        self.style = _call_style(self.model)

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale != 1.0

    def _network(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if self.style == "conditional":
            return _unwrap(self.model(x, t, encoder_hidden_states=cond, return_dict=False, **self.model_kwargs))
        if self.style == "unconditional":
            return _unwrap(self.model(x, t, return_dict=False, **self.model_kwargs))
        return _unwrap(self.model(x, t, cond, **self.model_kwargs))

    def raw(self, x, t: float, cond=None, uncond=None) -> torch.Tensor:
        """The network output (guided when the scale is not 1) at scalar model time t."""
        batch = x.shape[0]
        if not self.uses_guidance:
            t_vec = torch.full((batch,), float(t), dtype=model_time_dtype(x.dtype), device=x.device)
            return self._network(x, t_vec, _expand(cond, batch))
        t_vec = torch.full((2 * batch,), float(t), dtype=model_time_dtype(x.dtype), device=x.device)
        both = self._network(torch.cat([x, x]), t_vec, torch.cat([_expand(uncond, batch), _expand(cond, batch)]))
        out_u, out_c = both.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)

    def eps(self, x, t: float, cond=None, uncond=None) -> torch.Tensor:
        """ε̂ at scalar model time t."""
        out = self.raw(x, t, cond, uncond)
        if self.prediction_type == "epsilon":
            return out
        alpha, sigma = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        if self.prediction_type == "sample":
            return (x - alpha * out) / sigma
        return alpha * out + sigma * x

    def eps_and_x0(self, x, t: float, cond=None, uncond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂₀) at scalar model time t, with x̂₀ = (x − σ ε̂)/α."""
        eps = self.eps(x, t, cond, uncond)
        alpha, sigma = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        return eps, (x - sigma * eps) / alpha


def _expand(emb: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Broadcast a batch-1 embedding to the sample batch (differentiably)."""
    if emb is None or emb.shape[0] == batch:
        return emb
    return emb.expand(batch, *emb.shape[1:])


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
