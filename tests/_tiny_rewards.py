"""Tiny random-weight reward folders for the reward tests (no tests here, only builders), saved as real folders:

* ``aesthetic_head_pth``: a state dict with the LAION aesthetic head's exact module layout (an ``nn.Sequential``
  ``layers`` of Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear) at tiny widths, saved with
  ``torch.save`` like the published .pth;
* ``build_aesthetic``: a tiny CLIP folder (``_tiny_critics.build_clip``, 8-d embeddings) + that head converted;
* ``build_hps``: an open_clip folder (``open_clip_config.json`` + ``open_clip_model.safetensors``) of a tiny
  ViT/text-transformer CLIP, open_clip's local format (needs open_clip).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from _tiny_critics import build_clip

HEAD_WIDTHS = (8, 16, 8, 4, 4, 1)  # the real head: 768, 1024, 128, 64, 16, 1


def aesthetic_sequential(widths=HEAD_WIDTHS, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    a, b, c, d, e, f = widths
    return torch.nn.Sequential(
        torch.nn.Linear(a, b), torch.nn.Dropout(0.2), torch.nn.Linear(b, c), torch.nn.Dropout(0.2),
        torch.nn.Linear(c, d), torch.nn.Dropout(0.1), torch.nn.Linear(d, e), torch.nn.Linear(e, f)).eval()


def aesthetic_head_pth(path: Path, widths=HEAD_WIDTHS, seed: int = 0) -> Path:
    """``{"layers.0.weight": ..., ..., "layers.7.bias": ...}`` as in the published file."""
    holder = torch.nn.Module()
    holder.layers = aesthetic_sequential(widths, seed)
    torch.save(holder.state_dict(), path)
    return Path(path)


def build_aesthetic(root: Path, seed: int = 0) -> Path:
    from adjointdpm.rewards.convert_aesthetic import convert

    build_clip(root, seed)
    pth = aesthetic_head_pth(Path(str(root) + "_head.pth"), seed=seed)
    convert(pth, root)
    return Path(root)


HPS_CONFIG = {
    "model_cfg": {"embed_dim": 8,
                  "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 4},
                  "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}},
    "preprocess_cfg": {"size": 16, "mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                       "resize_mode": "shortest"},
}


def build_hps(root: Path, seed: int = 0) -> Path:
    import open_clip
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "open_clip_config.json").write_text(json.dumps(HPS_CONFIG))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{root}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "open_clip_model.safetensors"))
    return root
