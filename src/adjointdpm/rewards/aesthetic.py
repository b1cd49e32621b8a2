"""The LAION aesthetic predictor as a reward: ``aesthetic:FOLDER``.

r(x) = MLP(e(x) / ‖e(x)‖), e(x) the CLIP image embedding (ViT-L/14 for the published head, 768-d) through
the folder's own preprocessing re-done in torch. The head (christophschuhmann/improved-aesthetic-predictor,
``sac+logos+ava1-l14-linearMSE.pth``) is five linear layers 768 → 1024 → 128 → 64 → 16 → 1 with dropout
between them and no activation (the "linearMSE" heads; a "reluMSE" head has ReLUs, recorded in the file's
metadata). The folder holds

* a transformers CLIP folder: a whole ``CLIPModel`` or a ``CLIPVisionModelWithProjection``
  (``config.json``, ``model.safetensors``, ``preprocessor_config.json``), and
* ``aesthetic_head.safetensors``: tensors ``linear{i}.weight`` / ``linear{i}.bias`` in order, metadata
  ``activation`` = ``none`` | ``relu``; written from the published .pth by
  ``python -m adjointdpm.rewards.convert_aesthetic IN.pth FOLDER``.

``features`` are the unit image embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..critics.errors import CriticError
from ..critics.folders import check_folder, image_processor, load_model, read_config
from ..critics.preprocess import Preprocess
from .base import Reward, model_dtype

HEAD_FILE = "aesthetic_head.safetensors"
ACTIVATIONS = ("none", "relu")


class AestheticHead(torch.nn.Module):
    """A chain of linear layers (optionally ReLU between them) ending in one output."""

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor]], activation: str = "none"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise CriticError(f"aesthetic head activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.layers = torch.nn.ModuleList()
        for w, b in weights:
            lin = torch.nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            self.layers.append(lin)

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        for i, lin in enumerate(self.layers):
            e = lin(e)
            if self.activation == "relu" and i < len(self.layers) - 1:
                e = F.relu(e)
        return e.squeeze(-1)


def check_chain(weights: list[tuple[torch.Tensor, torch.Tensor]], where: str) -> None:
    """Consecutive layers must compose and the last one give one score."""
    if not weights:
        raise CriticError(f"{where}: no linear layers found")
    for i, (w, b) in enumerate(weights):
        if w.dim() != 2 or b.shape != (w.shape[0],):
            raise CriticError(f"{where}: layer {i} has weight {tuple(w.shape)} and bias {tuple(b.shape)}, not a linear layer")
        if i and w.shape[1] != weights[i - 1][0].shape[0]:
            raise CriticError(f"{where}: layer {i} takes {w.shape[1]} inputs but layer {i - 1} gives {weights[i - 1][0].shape[0]}")
    if weights[-1][0].shape[0] != 1:
        raise CriticError(f"{where}: the last layer gives {weights[-1][0].shape[0]} outputs, not one score")


def load_head(path: Path) -> AestheticHead:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    n = len([k for k in tensors if k.endswith(".weight")])
    try:
        weights = [(tensors[f"linear{i}.weight"].float(), tensors[f"linear{i}.bias"].float()) for i in range(n)]
    except KeyError as e:
        raise CriticError(f"{path}: missing tensor {e.args[0]} (write the file with "
                          "python -m adjointdpm.rewards.convert_aesthetic)") from None
    check_chain(weights, str(path))
    return AestheticHead(weights, meta.get("activation", "none"))


class AestheticReward(Reward):
    kind = "aesthetic"

    def __init__(self, vision: torch.nn.Module, preprocess: Preprocess, head: AestheticHead, spec: str, path: str):
        super().__init__(spec)
        self.vision, self.preprocess, self.head, self.path = vision, preprocess, head, path

    @classmethod
    def from_folder(cls, path, spec: str, device="cpu", what: str = "--reward") -> "AestheticReward":
        from transformers import CLIPModel, CLIPVisionModelWithProjection

        what = f"{what} aesthetic:"
        folder = check_folder(path, what)
        if not (folder / HEAD_FILE).is_file():
            raise CriticError(f"{what} {folder} has no {HEAD_FILE}: convert the published head with "
                              f"python -m adjointdpm.rewards.convert_aesthetic HEAD.pth {folder}")
        model_type = read_config(folder).get("model_type")
        if model_type not in ("clip", "clip_vision_model"):
            raise CriticError(f"{what} {folder} is a {model_type!r} model, not CLIP (CLIPModel or "
                              "CLIPVisionModelWithProjection)")
        proc = image_processor(folder, what)
        vision = load_model(CLIPModel if model_type == "clip" else CLIPVisionModelWithProjection, folder, what, device)
        head = load_head(folder / HEAD_FILE).to(device).eval().requires_grad_(False)
        reward = cls(vision, Preprocess(proc).to(device), head, spec, str(folder))
        dim = reward.features(torch.zeros(1, 3, 8, 8, device=device)).shape[-1]
        if dim != head.in_features:
            raise CriticError(f"{what} {folder}: the CLIP image embeddings have {dim} dimensions but "
                              f"{HEAD_FILE} takes {head.in_features} (use the CLIP model the head was trained on)")
        return reward

    def features(self, images: torch.Tensor) -> torch.Tensor:
        dtype = model_dtype(self.vision)
        pixels = self.preprocess(images, dtype)
        if hasattr(self.vision, "get_image_features"):
            e = self.vision.get_image_features(pixel_values=pixels)
            e = getattr(e, "pooler_output", e)
        else:
            e = self.vision(pixel_values=pixels).image_embeds
        return F.normalize(e.to(dtype), dim=-1)

    def score(self, images, prompts, fields):
        e = self.features(images)
        return self.head(e.to(model_dtype(self.head)))

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "folder": self.path, "head_activation": self.head.activation,
                "head_layers": [tuple(lin.weight.shape[::-1]) for lin in self.head.layers],
                "preprocess": self.preprocess.describe()}
