"""Input checks of ``sample``: every bad input gets one error that says what is wrong and how to fix it."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import nn

from .conditioning import tensors_with_paths
from .model import UNBATCHED_KEYS, NetworkStyle
from .schedule import NoiseSchedule


def check_tensor(name: str, t, *, finite: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}; convert it with .float()")
    if finite and not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf; sample it again or check how it was produced")


def check_sample_inputs(model, x_T, cond, uncond, guidance_scale: float, style: NetworkStyle) -> None:
    check_tensor("x_T", x_T, finite=False)
    if x_T.ndim < 2:
        raise ValueError(f"x_T must have a batch dimension, e.g. (B, C, H, W); got shape {tuple(x_T.shape)}")
    batch = x_T.shape[0]
    for name, tree in (("cond", cond), ("uncond", uncond)):
        if tree is not None and not isinstance(tree, (torch.Tensor, dict)):
            raise TypeError(f"{name} must be a tensor or a dict of the network's keyword arguments, got {type(tree).__name__}")
        for path, key, t in tensors_with_paths(tree, name):
            _check_conditioning_tensor(path, key, t, x_T, batch)
    _check_pair(cond, uncond)
    if guidance_scale != 1.0:
        if uncond is None or cond is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs both cond and uncond (the empty-prompt embedding); "
                "pass uncond=… or set guidance_scale=1"
            )
    elif uncond is not None:
        raise ValueError("uncond is given but guidance_scale is 1, so it would be ignored; set guidance_scale ≠ 1 or drop uncond")
    if style.kind == "unet" and _hidden_states(cond) is None:
        raise ValueError("this model takes encoder_hidden_states: pass cond=<text embeddings> (B, L, D)")
    if style.kind == "unconditional" and cond is not None:
        raise ValueError("this model is unconditional (no encoder_hidden_states): drop cond/uncond")
    if style.kind in ("unet", "transformer"):
        _check_keys(model, style, cond, x_T)
    if isinstance(model, nn.Module):
        _check_model_matches(model, x_T, cond, style)
    check_tensor("x_T", x_T)
    for name, tree in (("cond", cond), ("uncond", uncond)):
        for path, _, t in tensors_with_paths(tree, name):
            if t.is_floating_point():
                check_tensor(path, t)


def _check_conditioning_tensor(name: str, key: str | None, t: torch.Tensor, x_T, batch: int) -> None:
    if key is None:  # cond given as a tensor: the embeddings themselves
        check_tensor(name, t, finite=False)
    if t.device != x_T.device:
        raise ValueError(f"{name} is on {t.device} but x_T is on {x_T.device}; move both to one device with .to()")
    if t.is_floating_point() and t.ndim >= 2 and t.dtype != x_T.dtype:
        raise TypeError(f"{name} is {t.dtype} but x_T is {x_T.dtype}; use one dtype, e.g. {name}.to(x_T.dtype)")
    if key not in UNBATCHED_KEYS and t.ndim >= 1 and t.shape[0] not in (1, batch):
        raise ValueError(f"{name} has batch {t.shape[0]} but x_T has batch {batch}; give {name} batch 1 or {batch}")


def _check_pair(cond, uncond) -> None:
    """uncond must have cond's structure: same type, no extra keys, same shapes except the batch."""
    if cond is None or uncond is None:
        return
    if isinstance(cond, torch.Tensor) != isinstance(uncond, torch.Tensor):
        raise TypeError(
            f"cond is a {type(cond).__name__} but uncond is a {type(uncond).__name__}; "
            "give uncond the same structure as cond (encode the empty prompt the same way)"
        )
    if isinstance(cond, torch.Tensor):
        if uncond.shape[1:] != cond.shape[1:]:
            raise ValueError(
                f"uncond has shape {tuple(uncond.shape)} but cond has {tuple(cond.shape)}; "
                "encode the empty prompt with the same text encoder and padding as the prompt"
            )
        return
    extra = [k for k in uncond if k not in cond]
    if extra:
        raise ValueError(f"uncond has key {extra[0]!r} that cond lacks; give both the same keys (a key only in cond is shared)")
    for key, value in uncond.items():
        if isinstance(value, (torch.Tensor, dict)) or isinstance(cond[key], (torch.Tensor, dict)):
            if isinstance(value, dict) != isinstance(cond[key], dict):
                raise TypeError(f"cond[{key!r}] and uncond[{key!r}] differ in structure (a dict and a tensor)")
            if isinstance(value, dict):
                _check_pair(cond[key], value)
            elif key not in UNBATCHED_KEYS and value.shape[1:] != cond[key].shape[1:]:
                raise ValueError(
                    f"uncond[{key!r}] has shape {tuple(value.shape)} but cond[{key!r}] has {tuple(cond[key].shape)}; "
                    "encode the empty prompt the same way as the prompt"
                )


def _hidden_states(cond):
    return cond.get("encoder_hidden_states") if isinstance(cond, dict) else cond


def _check_keys(model, style: NetworkStyle, cond, x_T) -> None:
    """The cond dict's keys are the network's keyword arguments; families' required ones are present."""
    name = type(model).__name__
    if isinstance(cond, dict) and not style.accepts_any:
        taken = set(style.parameters) - {"sample", "hidden_states", "timestep", "return_dict"}
        unknown = [k for k in cond if k not in taken]
        if unknown:
            raise ValueError(
                f"cond has key {unknown[0]!r} that {name} does not take; its keyword arguments are "
                f"{', '.join(sorted(taken))}"
            )
    if style.kind != "transformer":
        return
    given = set(cond) if isinstance(cond, dict) else ({"encoder_hidden_states"} if cond is not None else set())
    flux = style.timestep_scale != 1.0
    needed = ["pooled_projections", "txt_ids", "img_ids"] if flux else []
    if "pooled_projections" in style.parameters and not flux and "pooled_projections" in _required(model):
        needed.append("pooled_projections")
    missing = [k for k in needed if k not in given]
    if missing:
        raise ValueError(
            f"{name} needs cond[{missing[0]!r}] (its pipeline passes {', '.join(needed)}); give cond as a dict "
            "with encoder_hidden_states and those keys, e.g. from adjointdpm.load_components(folder).encode_prompt"
        )
    if flux and x_T.ndim != 3:
        raise ValueError(
            f"{name} takes packed latents (B, H/2·W/2, 4·C) but x_T has shape {tuple(x_T.shape)}; pack them as "
            "FluxPipeline._pack_latents does (or use load_components(folder).noise)"
        )


def _required(model) -> set[str]:
    """Keyword arguments of the network's forward that have no default (or a None default but are needed)."""
    params = inspect.signature(model.forward).parameters
    needed = {k for k, p in params.items() if p.default is inspect.Parameter.empty}
    if getattr(getattr(model, "config", None), "pooled_projection_dim", None):
        needed.add("pooled_projections")
    return needed


def _check_model_matches(model: nn.Module, x_T, cond, style: NetworkStyle) -> None:
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
    packed = style.kind == "transformer" and style.timestep_scale != 1.0
    if isinstance(channels, int) and not packed:
        if x_T.ndim != 4:
            raise ValueError(f"x_T must have shape (B, C, H, W) for this model, got {tuple(x_T.shape)}; add the batch dimension with x_T[None]")
        if x_T.shape[1] != channels:
            raise ValueError(f"x_T has {x_T.shape[1]} channels but the model expects in_channels={channels}; sample x_T with shape (B, {channels}, H, W)")
    if isinstance(channels, int) and packed and x_T.shape[-1] != channels:
        raise ValueError(f"x_T has {x_T.shape[-1]} features per token but the model expects in_channels={channels}; pack 2×2 patches of the {channels // 4}-channel latents")
    hidden = _hidden_states(cond)
    width, source = _text_width(config)
    if isinstance(hidden, torch.Tensor) and isinstance(width, int) and hidden.shape[-1] != width:
        raise ValueError(
            f"cond has width {hidden.shape[-1]} but the model's {source} is {width}; "
            "encode the prompt with the text encoder that matches this network"
        )


def _text_width(config) -> tuple[int | None, str]:
    """The width the network expects of encoder_hidden_states, and the config field that says so."""
    for field in ("caption_channels", "joint_attention_dim", "cross_attention_dim"):
        value = getattr(config, field, None)
        if isinstance(value, int):
            return value, field
    return None, ""


def resolve_timesteps(schedule: NoiseSchedule, timesteps, steps) -> np.ndarray:
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


# ------------------------------------------------------------------------------ stochastic samplers
def check_eta(eta, solver: str) -> float:
    """η of DDIM: a number in [0, 1], and only for solver='ddim'."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.floating, np.integer)):
        raise TypeError(f"eta must be a number in [0, 1], got {type(eta).__name__}")
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM's posterior noise), got {eta:g}")
    if eta != 0.0 and solver != "ddim":
        raise ValueError(f"eta applies to solver='ddim' only, got solver={solver!r} with eta={eta:g}; drop eta")
    return eta


def check_noise_unused(noise, solver: str) -> None:
    if noise is not None:
        raise ValueError(
            f"noise is given but solver={solver!r} is deterministic and injects none; drop noise=, or use a "
            "stochastic solver: 'ddpm', 'euler_ancestral', 'dpmpp2m_sde', 'lcm', or 'ddim' with eta > 0"
        )


def check_noise_tensor(noise: torch.Tensor, num_steps: int, x_T: torch.Tensor) -> None:
    """An explicit noise tensor: (N, B, *latent), x_T's dtype and device, finite."""
    expected = (num_steps, *x_T.shape)
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
    if tuple(noise.shape) != expected:
        raise ValueError(
            f"noise has shape {tuple(noise.shape)} but {num_steps} steps of x_T {tuple(x_T.shape)} need {expected}: "
            "noise[i] is what step i injects"
        )
    if noise.dtype != x_T.dtype or noise.device != x_T.device:
        raise TypeError(f"noise is {noise.dtype} on {noise.device} but x_T is {x_T.dtype} on {x_T.device}; use noise.to(x_T)")
    if not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or inf")
