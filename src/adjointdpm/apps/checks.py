"""Checks of user input that every command shares: a torch device, a writable output folder, a prompt the
tokenizer takes whole. Each failure is one :class:`~.errors.UserInputError` line naming the fix."""

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
