"""Convert a published HPS checkpoint (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) into an
``hpsv2:`` folder: open_clip's ``open_clip_config.json`` + ``open_clip_model.safetensors``.

    python -m adjointdpm.rewards.convert_hps HPS_v2.1_compressed.pt FOLDER [--arch ViT-H-14]

The checkpoint is read with ``torch.load(weights_only=True)`` (tensors only, no code runs); its
``state_dict`` (or the file itself, if it is one) is written as safetensors, with the ``module.`` prefix of
a data-parallel save removed. The config is open_clip's built-in one for ``--arch`` (HPS: ViT-H-14) and the
preprocessing open_clip's default for it (224 px, bicubic, shorter side then centre crop, OpenAI mean/std).
Needs the optional extra ``adjointdpm[hps]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..critics.errors import CriticError
from .hps import CONFIG_FILE, import_open_clip


def convert(checkpoint, folder, arch: str = "ViT-H-14") -> Path:
    """Write the ``hpsv2:`` folder; returns it."""
    from safetensors.torch import save_file

    open_clip = import_open_clip("convert_hps")
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    checkpoint, folder = Path(checkpoint).expanduser(), Path(folder).expanduser()
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise CriticError(f"--arch {arch!r} is not an open_clip model (HPS uses ViT-H-14)")
    if not checkpoint.is_file():
        raise CriticError(f"{checkpoint} does not exist (give the HPS checkpoint, e.g. HPS_v2.1_compressed.pt)")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a user's file: one line
        raise CriticError(f"{checkpoint} cannot be read as a tensors-only checkpoint ({type(e).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CriticError(f"{checkpoint} holds no state dict of tensors")
    tensors = {str(k).removeprefix("module."): v.contiguous().clone() for k, v in state.items()}
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    preprocess = {"size": size, "mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2) + "\n")
    save_file(tensors, str(folder / "open_clip_model.safetensors"), metadata={"source": checkpoint.name, "arch": arch})
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adjointdpm.rewards.convert_hps", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="HPS_v2_compressed.pt or HPS_v2.1_compressed.pt")
    ap.add_argument("folder", help="the hpsv2: folder to write (created if missing)")
    ap.add_argument("--arch", default="ViT-H-14", help="the open_clip architecture (HPS: ViT-H-14)")
    args = ap.parse_args(argv)
    try:
        out = convert(args.checkpoint, args.folder, args.arch)
    except CriticError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / CONFIG_FILE} and {out / 'open_clip_model.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
