"""A transformers image processor's preprocessing, re-done differentiably in torch.

Images come in as (B, C, H, W) in [-1, 1] (the decoded samples). The steps, in the processor's order,
with the parameters read from the processor object (its config plus its class defaults):

1. x ← (x + 1) / 2 — pixel values in [0, 1] (what ``do_rescale`` with ``rescale_factor = 1/255`` gives
   from 8-bit pixels); greyscale is repeated to 3 channels (``do_convert_rgb``).
2. resize (``do_resize``): ``size = {"shortest_edge": s}`` scales the shorter side to s keeping the aspect
   ratio (ConvNeXt-style processors with ``crop_pct`` and s < 384 scale it to ⌊s / crop_pct⌋ and then
   centre-crop s × s; s ≥ 384 warps to s × s); ``{"height": h, "width": w}`` warps to h × w. Bilinear or
   bicubic as the processor's ``resample`` says, antialiased (PIL filters antialias too).
3. centre crop (``do_center_crop``) to ``crop_size``, top/left offsets ⌊(H − h)/2⌋, ⌊(W − w)/2⌋ as in transformers.
4. normalise (``do_normalize``): (x − mean) / std per channel.

Every step is differentiable; nothing goes through PIL or numpy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import CriticError


def _get(proc, name, default=None):
    value = getattr(proc, name, None)
    return default if value is None else value


def _as_dict(size) -> dict:
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    if hasattr(size, "items") or isinstance(size, dict):
        return {k: v for k, v in dict(size).items() if v is not None}
    return {k: getattr(size, k) for k in ("shortest_edge", "longest_edge", "height", "width")
            if getattr(size, k, None) is not None}


def _resample_mode(resample) -> str:
    value = int(getattr(resample, "value", resample)) if resample is not None else 2
    return {2: "bilinear", 3: "bicubic"}.get(value, "bilinear")  # PIL: 2 bilinear, 3 bicubic


class Preprocess(torch.nn.Module):
    """The differentiable equivalent of one transformers image processor (see the module docstring)."""

    def __init__(self, processor):
        super().__init__()
        self.do_resize = bool(_get(processor, "do_resize", True))
        self.size = _as_dict(_get(processor, "size"))
        self.crop_pct = getattr(processor, "crop_pct", None)
        self.do_center_crop = bool(_get(processor, "do_center_crop", False))
        self.crop_size = _as_dict(_get(processor, "crop_size"))
        self.mode = _resample_mode(getattr(processor, "resample", None))
        self.do_normalize = bool(_get(processor, "do_normalize", True))
        mean = _get(processor, "image_mean", (0.5, 0.5, 0.5))
        std = _get(processor, "image_std", (0.5, 0.5, 0.5))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        if self.do_resize and not ({"shortest_edge"} <= set(self.size) or {"height", "width"} <= set(self.size)):
            raise CriticError(f"image processor size {self.size} is not supported (use shortest_edge or height/width)")

    def describe(self) -> dict:
        return {"resize": self.size if self.do_resize else None, "crop_pct": self.crop_pct,
                "center_crop": self.crop_size if self.do_center_crop else None, "resample": self.mode,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def _resize(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (h, w):
            return x
        return F.interpolate(x, size=(h, w), mode=self.mode, align_corners=False, antialias=True)

    @staticmethod
    def _crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        H, W = x.shape[-2:]
        if (H, W) == (h, w):
            return x
        if h > H or w > W:  # (the processors pad; a critic this small is not worth it)
            x = F.pad(x, (max(0, (w - W + 1) // 2), max(0, (w - W) // 2), max(0, (h - H + 1) // 2), max(0, (h - H) // 2)))
            H, W = x.shape[-2:]
        top, left = (H - h) // 2, (W - w) // 2
        return x[..., top:top + h, left:left + w]

    @staticmethod
    def _shortest_edge_size(H: int, W: int, s: int) -> tuple[int, int]:
        short, long = (H, W) if H <= W else (W, H)
        new_short, new_long = s, int(s * long / short)
        return (new_short, new_long) if H <= W else (new_long, new_short)

    def forward(self, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The model's pixel values; computed in float32, or in ``dtype`` when given (float64 for gradient checks)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise CriticError(f"critics take images (B, 1 or 3, H, W), got {tuple(images.shape)}")
        x = (images.to(dtype or torch.float32) + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if self.do_resize:
            H, W = x.shape[-2:]
            if "shortest_edge" in self.size:
                s = int(self.size["shortest_edge"])
                if self.crop_pct is not None and s < 384:
                    x = self._resize(x, *self._shortest_edge_size(H, W, int(s / self.crop_pct)))
                    x = self._crop(x, s, s)
                elif self.crop_pct is not None:
                    x = self._resize(x, s, s)
                else:
                    x = self._resize(x, *self._shortest_edge_size(H, W, s))
            else:
                x = self._resize(x, int(self.size["height"]), int(self.size["width"]))
        if self.do_center_crop and self.crop_size:
            x = self._crop(x, int(self.crop_size["height"]), int(self.crop_size["width"]))
        if self.do_normalize:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x
