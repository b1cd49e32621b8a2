"""Convert the LAION aesthetic predictor's published head (.pth) into ``aesthetic_head.safetensors``.

    python -m adjointdpm.rewards.convert_aesthetic sac+logos+ava1-l14-linearMSE.pth FOLDER [--activation relu]

The .pth is a state dict of an ``nn.Sequential`` named ``layers``: ``layers.0`` Linear(768, 1024), ``layers.1``
Dropout, ``layers.2`` Linear(1024, 128), Dropout, ``layers.4`` Linear(128, 64), Dropout, ``layers.6``
Linear(64, 16), ``layers.7`` Linear(16, 1). It is read with ``torch.load(weights_only=True)`` (tensors only,
no code runs); the 2-d ``*.weight`` tensors, in the order of their module index, with their biases become
``linear0`` … ``linear4``. Dropout has no weights, and activations none, so a "reluMSE" head must be named
with ``--activation relu``. FOLDER (created if needed) is where the CLIP model goes too (see
:mod:`adjointdpm.rewards.aesthetic`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from ..critics.errors import CriticError
from .aesthetic import ACTIVATIONS, HEAD_FILE, check_chain

_LAYER = re.compile(r"^(.*?)(\d+)\.weight$")


def head_layers(state: dict, where: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (weight, bias) pairs of the linear layers of a Sequential's state dict, in module order."""
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    found = []
    for key, w in state.items():
        m = _LAYER.match(str(key))
        if m and isinstance(w, torch.Tensor) and w.dim() == 2:
            bias = state.get(f"{m.group(1)}{m.group(2)}.bias")
            if not isinstance(bias, torch.Tensor):
                raise CriticError(f"{where}: {key} has no bias {m.group(1)}{m.group(2)}.bias")
            found.append((int(m.group(2)), w.float().contiguous(), bias.float().contiguous()))
    found.sort(key=lambda t: t[0])
    weights = [(w, b) for _, w, b in found]
    check_chain(weights, where)
    return weights


def convert(pth, folder, activation: str = "none") -> Path:
    """Write ``FOLDER/aesthetic_head.safetensors`` from the head's .pth state dict; returns its path."""
    from safetensors.torch import save_file

    pth, folder = Path(pth).expanduser(), Path(folder).expanduser()
    if activation not in ACTIVATIONS:
        raise CriticError(f"--activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
    if not pth.is_file():
        raise CriticError(f"{pth} does not exist (give the aesthetic head's .pth state dict)")
    try:
        state = torch.load(pth, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a user's file: one line
        raise CriticError(f"{pth} cannot be read as a tensors-only state dict ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if not isinstance(state, dict):
        raise CriticError(f"{pth} holds a {type(state).__name__}, not a state dict")
    weights = head_layers(state, str(pth))
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, (w, b) in enumerate(weights):
        tensors[f"linear{i}.weight"], tensors[f"linear{i}.bias"] = w, b
    out = folder / HEAD_FILE
    save_file(tensors, str(out), metadata={"activation": activation, "source": pth.name})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adjointdpm.rewards.convert_aesthetic", description=__doc__.split("\n")[0])
    ap.add_argument("pth", help="the published head, e.g. sac+logos+ava1-l14-linearMSE.pth")
    ap.add_argument("folder", help="the reward folder (the CLIP model's folder); created if missing")
    ap.add_argument("--activation", default="none", choices=ACTIVATIONS, help="between the linear layers (linearMSE: none)")
    args = ap.parse_args(argv)
    try:
        out = convert(args.pth, args.folder, args.activation)
    except CriticError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    if not (out.parent / "config.json").is_file():
        print(f"now save the CLIP model (ViT-L/14 for the LAION heads) and its image processor into {out.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
