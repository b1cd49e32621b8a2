"""Input checks of ``sample``: every bad input gets one error that says what is wrong and how to fix it."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .schedule import VPSchedule


def check_tensor(name: str, t, *, finite: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}; convert it with .float()")
    if finite and not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf; sample it again or check how it was produced")


def check_sample_inputs(model, x_T, cond, uncond, guidance_scale: float, style: str) -> None:
    check_tensor("x_T", x_T, finite=False)
    if x_T.ndim < 2:
        raise ValueError(f"x_T must have a batch dimension, e.g. (B, C, H, W); got shape {tuple(x_T.shape)}")
    batch = x_T.shape[0]
    for name, emb in (("cond", cond), ("uncond", uncond)):
        if emb is None:
            continue
        check_tensor(name, emb, finite=False)
        if emb.device != x_T.device:
            raise ValueError(f"{name} is on {emb.device} but x_T is on {x_T.device}; move both to one device with .to()")
        if emb.dtype != x_T.dtype:
            raise TypeError(f"{name} is {emb.dtype} but x_T is {x_T.dtype}; use one dtype, e.g. {name}.to(x_T.dtype)")
        if emb.shape[0] not in (1, batch):
            raise ValueError(f"{name} has batch {emb.shape[0]} but x_T has batch {batch}; give {name} batch 1 or {batch}")
    if uncond is not None and cond is not None and uncond.shape[1:] != cond.shape[1:]:
        raise ValueError(
            f"uncond has shape {tuple(uncond.shape)} but cond has {tuple(cond.shape)}; "
            "encode the empty prompt with the same text encoder and padding as the prompt"
        )
    if guidance_scale != 1.0:
        if uncond is None or cond is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs both cond and uncond (the empty-prompt embedding); "
                "pass uncond=… or set guidance_scale=1"
            )
    elif uncond is not None:
        raise ValueError("uncond is given but guidance_scale is 1, so it would be ignored; set guidance_scale ≠ 1 or drop uncond")
    if style == "conditional" and cond is None:
        raise ValueError("this model takes encoder_hidden_states: pass cond=<text embeddings> (B, L, D)")
    if style == "unconditional" and cond is not None:
        raise ValueError("this model is unconditional (no encoder_hidden_states): drop cond/uncond")
    if isinstance(model, nn.Module):
        _check_model_matches(model, x_T, cond)
    for name, t in (("x_T", x_T), ("cond", cond), ("uncond", uncond)):
        if t is not None:
            check_tensor(name, t)


def _check_model_matches(model: nn.Module, x_T, cond) -> None:
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is not None:
        if weight.device != x_T.device:
            raise ValueError(f"the model is on {weight.device} but x_T is on {x_T.device}; call model.to({str(x_T.device)!r}) or move x_T")
        if weight.dtype != x_T.dtype:
            raise TypeError(
                f"the model's weights are {weight.dtype} but x_T is {x_T.dtype}; "
                f"use one dtype: model.to({x_T.dtype}) or x_T.to({weight.dtype})"
            )
    config = getattr(model, "config", None)
    channels = getattr(config, "in_channels", None)
    if isinstance(channels, int) and x_T.ndim != 4:
        raise ValueError(f"x_T must have shape (B, C, H, W) for this model, got {tuple(x_T.shape)}; add the batch dimension with x_T[None]")
    if isinstance(channels, int) and x_T.shape[1] != channels:
        raise ValueError(f"x_T has {x_T.shape[1]} channels but the model expects in_channels={channels}; sample x_T with shape (B, {channels}, H, W)")
    width = getattr(config, "cross_attention_dim", None)
    if cond is not None and isinstance(width, int) and cond.shape[-1] != width:
        raise ValueError(
            f"cond has width {cond.shape[-1]} but the model's cross_attention_dim is {width}; "
            "encode the prompt with the text encoder that matches this UNet"
        )


def resolve_timesteps(schedule: VPSchedule, timesteps, steps) -> np.ndarray:
    """Validated model times t_0 > … > t_{N−1} from explicit timesteps or a number of steps."""
    if timesteps is None and steps is None:
        raise ValueError("give either timesteps=… (e.g. scheduler.timesteps) or steps=N")
    if timesteps is not None and steps is not None:
        raise ValueError("give timesteps=… or steps=N, not both")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be an integer ≥ 1, got {steps!r}")
        return schedule.default_timesteps(int(steps))
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.detach().to("cpu", torch.float64).numpy()
    t = np.asarray(timesteps, dtype=np.float64)
    if t.ndim != 1 or t.size < 1:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("timesteps contain NaN or inf")
    if t.size > 1 and not np.all(np.diff(t) < 0):
        raise ValueError(
            "timesteps must be strictly decreasing (from noise to data), as diffusers gives them; "
            f"got {t[:6].tolist()}{'…' if t.size > 6 else ''}"
        )
    tol = 1e-9 * max(1.0, schedule.t_max)
    if t[0] > schedule.t_max + tol or t[-1] < schedule.t_min - tol:
        raise ValueError(
            f"timesteps must lie in [{schedule.t_min:g}, {schedule.t_max:g}] for {schedule!r}; "
            f"got {t[0]:g} … {t[-1]:g}"
        )
    return t
