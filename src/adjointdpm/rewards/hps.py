"""Human Preference Score v2 as a reward: ``hpsv2:FOLDER`` (needs the optional extra ``adjointdpm[hps]``).

HPSv2 / v2.1 is open_clip's ViT-H-14 fine-tuned on human preferences; its score is the cosine of the
unit image and text embeddings, r = ⟨e_I(x), e_T(p)⟩ (about 0.2–0.35; v2.0 and v2.1 scores are not
comparable). The folder is open_clip's own local format:

* ``open_clip_config.json`` — ``{"model_cfg": {...}, "preprocess_cfg": {...}}`` (the ViT-H-14 config), and
* ``open_clip_model.safetensors`` — the weights; written from the published ``HPS_v2*_compressed.pt`` by
  ``python -m adjointdpm.rewards.convert_hps IN.pt FOLDER``.

The weights are read from safetensors only (open_clip builds the empty model from the config). The image
preprocessing — resize of the shorter side (or a warp, ``resize_mode: squash``), centre crop, normalisation
with the config's mean/std — is re-done in torch so the gradient reaches the pixels. The text is tokenised by
open_clip's bundled tokenizer (no download). ``features`` are e_I(x).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from ..critics.errors import CriticError
from ..critics.folders import PICKLE_SUFFIXES
from ..critics.preprocess import Preprocess
from .base import Reward, model_dtype

CONFIG_FILE = "open_clip_config.json"
EXTRA = "pip install 'adjointdpm[hps]'  (open_clip_torch)"


def import_open_clip(what: str = "hpsv2"):
    """open_clip, or one line naming the optional extra."""
    try:
        import open_clip
    except Exception as e:  # noqa: BLE001 - missing, or a broken torchvision: one line either way
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CriticError(f"{what} needs open_clip_torch, the optional extra: {EXTRA} ({type(e).__name__}: {detail})") from None
    return open_clip


def check_hps_folder(path, what: str) -> tuple[Path, Path]:
    """(folder, its safetensors weights), or one line naming what is missing."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CriticError(f"{what} {folder} is not a folder (expected {CONFIG_FILE} + open_clip_model.safetensors)")
    if not (folder / CONFIG_FILE).is_file():
        raise CriticError(f"{what} {folder} has no {CONFIG_FILE}: convert the HPS checkpoint with "
                          f"python -m adjointdpm.rewards.convert_hps HPS_v2.1_compressed.pt {folder}")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f"; found only {', '.join(pickles)} (pickle weights are never loaded)" if pickles else ""
        raise CriticError(f"{what} {folder} has no .safetensors weights{hint}: convert them with "
                          "python -m adjointdpm.rewards.convert_hps")
    preferred = [w for w in weights if w.name == "open_clip_model.safetensors"]
    return folder, (preferred or weights)[0]


def preprocess_from_cfg(cfg: dict, what: str) -> Preprocess:
    """open_clip's eval preprocessing (a ``preprocess_cfg``) as the differentiable :class:`Preprocess`."""
    size = cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    mode = cfg.get("resize_mode", "shortest")
    if mode == "shortest":
        resize = {"shortest_edge": min(h, w)}
    elif mode == "squash":
        resize = {"height": h, "width": w}
    else:
        raise CriticError(f"{what}: preprocess resize_mode {mode!r} is not supported (use shortest or squash)")
    proc = SimpleNamespace(do_resize=True, size=resize, do_center_crop=True, crop_size={"height": h, "width": w},
                           resample=3 if cfg.get("interpolation", "bicubic") == "bicubic" else 2,
                           do_normalize=True, image_mean=tuple(cfg.get("mean")), image_std=tuple(cfg.get("std")))
    return Preprocess(proc)


class HpsReward(Reward):
    kind = "hpsv2"

    def __init__(self, model, tokenizer, preprocess: Preprocess, spec: str, path: str):
        super().__init__(spec)
        self.model, self.tokenizer, self.preprocess, self.path = model, tokenizer, preprocess, path
        self._text_cache: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_folder(cls, path, spec: str, device="cpu", what: str = "--reward") -> "HpsReward":
        from safetensors.torch import load_file

        what = f"{what} hpsv2:"
        folder, weights = check_hps_folder(path, what)
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
        except json.JSONDecodeError as e:
            raise CriticError(f"{folder / CONFIG_FILE} is not valid JSON ({e})") from None
        if "model_cfg" not in config:
            raise CriticError(f"{folder / CONFIG_FILE} has no model_cfg (open_clip's format: model_cfg + preprocess_cfg)")
        open_clip = import_open_clip(what)
        source = f"local-dir:{folder}"
        try:
            model = open_clip.create_model(source, load_weights=False, device="cpu")
            tokenizer = open_clip.get_tokenizer(source)
        except Exception as e:  # noqa: BLE001 - open_clip's config errors: one line
            raise CriticError(f"{what} {folder}: open_clip cannot build the model ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        state = load_file(str(weights))
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CriticError(f"{what} {weights} does not fit the config's model ({str(e).strip().splitlines()[0]}...)") from None
        model = model.to(device).eval().requires_grad_(False)
        pp = preprocess_from_cfg(getattr(model.visual, "preprocess_cfg", None) or config.get("preprocess_cfg", {}), what)
        return cls(model, tokenizer, pp.to(device), spec, str(folder))

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        dtype, device = model_dtype(self.model), self.preprocess.mean.device
        missing = sorted({p for p in prompts if (p, dtype, device) not in self._text_cache})
        if missing:
            with torch.no_grad():
                e = self.model.encode_text(self.tokenizer(missing).to(device), normalize=True)
            for p, v in zip(missing, e):
                self._text_cache[(p, dtype, device)] = v.to(dtype)
        return torch.stack([self._text_cache[(p, dtype, device)] for p in prompts])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        dtype = model_dtype(self.model)
        return self.model.encode_image(self.preprocess(images, dtype), normalize=True).to(dtype)

    def score(self, images, prompts, fields):
        return (self.features(images) * self.text_embeds(prompts)).sum(-1)

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "folder": self.path, "preprocess": self.preprocess.describe()}
