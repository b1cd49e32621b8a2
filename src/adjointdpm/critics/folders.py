"""Opening a critic folder saved by transformers (or diffusers), or a Hugging Face id: safetensors only.

``check_folder`` takes a local folder or a Hub id ``org/name[@revision]`` (its snapshot in the Hugging
Face cache, downloaded when online, see :mod:`adjointdpm.hub`), and refuses, with one line, a path that
does not exist, a folder without ``config.json``
and a folder whose weights are pickle files only (``pytorch_model.bin``, ``*.ckpt``, ``*.pt``): they are
never opened. ``image_processor`` reads the folder's preprocessor config through transformers' own
image-processor classes (so their defaults apply), without ever running them on an image.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CriticError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def check_folder(path, what: str) -> Path:
    """The critic folder ``path`` (``what`` names the option), checked to hold safetensors weights: a local
    folder, or the snapshot of a Hugging Face id."""
    from ..hub import HubError, parse_hub_id, resolve

    folder = Path(path).expanduser()
    if not folder.exists() and parse_hub_id(path) is None:
        raise CriticError(f"{what} {folder} does not exist (give a folder saved by transformers, or a Hugging Face "
                          "id org/name)")
    try:
        folder = resolve(path, layout="model", what=what)
    except HubError as e:
        raise CriticError(str(e)) from None
    if not folder.is_dir():
        raise CriticError(f"{what} {folder} is not a folder (expected config.json + model.safetensors)")
    if not (folder / "config.json").is_file():
        raise CriticError(f"{what} {folder} has no config.json: not a folder saved by transformers' save_pretrained")
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json"))
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = (f"; found only {', '.join(pickles)} (pickle weights are never loaded: convert them with "
                "save_pretrained(..., safe_serialization=True))") if pickles else ""
        raise CriticError(f"{what} {folder} has no .safetensors weights{hint}")
    return folder


def read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CriticError(f"{folder / 'config.json'} is not valid JSON ({e})") from None


def image_processor(folder: Path, what: str):
    """The folder's transformers image processor (its preprocessor_config.json), offline."""
    from transformers import AutoImageProcessor
    from transformers.utils import logging

    if not (folder / "preprocessor_config.json").is_file():
        raise CriticError(f"{what} {folder} has no preprocessor_config.json (save the model's image processor "
                          "there too: processor.save_pretrained(folder))")
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # (transformers warns that its fast processors need torchvision; none run here)
    try:
        return AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CriticError(f"{what} {folder}: cannot read its image processor ({str(e).splitlines()[0]})") from None
    finally:
        logging.set_verbosity(level)


def load_model(cls, folder: Path, what: str, device):
    """``cls.from_pretrained(folder)`` offline from safetensors, in eval mode with frozen weights."""
    from transformers.utils import logging

    bar, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()  # (a local folder loads in well under a second)
    logging.set_verbosity_error()  # (a CLIP folder opened as its vision tower reports the text weights it skips)
    try:
        model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CriticError(f"{what} {folder}: cannot load it as {cls.__name__} ({first})") from None
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()
    return model.to(device).eval().requires_grad_(False)
