"""Checks of user input that every command shares: a torch device, a writable output folder, a prompt the
tokenizer takes whole, the image size, prompt length and negative prompt put into a model's settings. Each failure is one :class:`~.errors.UserInputError` line naming the fix."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UserInputError


def parse_device(name: str) -> torch.device:
    """``--device NAME`` as a torch device that exists here."""
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserInputError(f"bad --device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda requested but no CUDA device is available")
    return dev


def check_writable(out: Path) -> Path:
    """Create ``out`` and check a file can be written there; one clear error otherwise."""
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserInputError(f"cannot write to --out {out}: {reason}") from None
    return out


def check_prompt_length(tokenizer, prompt: str) -> None:
    """One clear error for a prompt longer than the tokenizer takes (it would be cut silently)."""
    n = len(tokenizer(prompt, truncation=False, add_special_tokens=True, verbose=False)["input_ids"])
    if n > tokenizer.model_max_length:
        raise UserInputError(
            f"prompt {prompt!r} is {n} tokens long; this model's tokenizer takes at most "
            f"{tokenizer.model_max_length} (start and end tokens included): shorten it")


def apply_image_settings(comps, height: int | None = None, width: int | None = None,
                         max_sequence_length: int | None = None, negative_prompt: str | None = None) -> None:
    """Put ``--height``, ``--width``, ``--max-sequence-length`` and ``--negative-prompt`` into the model's
    settings (what its family's latent shape and prompt encoding read), each checked: the size a multiple of
    what the latent grid needs, the sequence length on the families with a T5 encoder, the negative prompt
    within the tokenizer's length."""
    settings = comps.settings
    step = size_multiple(comps)
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if value < step or value % step:
            raise UserInputError(f"--{name} must be a positive multiple of {step} for this model, got {value}")
        settings[name] = int(value)
    if max_sequence_length is not None:
        if "max_sequence_length" not in settings:
            raise UserInputError("--max-sequence-length applies to models with a T5 text encoder (SD3, Flux, "
                                 "PixArt), not this one")
        if max_sequence_length < 1:
            raise UserInputError(f"--max-sequence-length must be >= 1, got {max_sequence_length}")
        settings["max_sequence_length"] = int(max_sequence_length)
    if negative_prompt is not None:
        check_prompt_length(comps.prompt_tokenizer, negative_prompt)
        settings["negative_prompt"] = negative_prompt


def size_multiple(comps) -> int:
    """What an image's height and width must be a multiple of, as the family's pipeline checks them: 8 on
    SD/SDXL UNets, the VAE factor times the patch size on SD3/PixArt, twice the VAE factor on Flux (2x2
    packed latent patches)."""
    import math

    f = comps.family_spec.vae_scale_factor(comps)
    if comps.family == "flux":
        return 2 * f
    if comps.family in ("sd", "sdxl"):
        return math.lcm(8, f)
    return f * int(getattr(comps.network.config, "patch_size", 1) or 1)
